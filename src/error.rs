//! `ApiError` and the single translation of every internal error into an
//! HTTP status and an OperationOutcome. Handlers return `ApiError`; the
//! embedded store uses [`status_and_outcome`] for batch entry outcomes.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::fhir::FHIR_JSON;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Malformed request (bad JSON, bad header, bad parameter).
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    ServiceUnavailable(String),
    /// The contact index refused a query (400, naming the parameter) or
    /// failed (503).
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
}

impl From<crate::jobs::schedule::CancelError> for ApiError {
    fn from(error: crate::jobs::schedule::CancelError) -> Self {
        use crate::jobs::schedule::CancelError;
        match error {
            CancelError::NotFound(_) => ApiError::NotFound(error.to_string()),
            CancelError::Final { .. } => ApiError::Store(StoreError::Conflict(error.to_string())),
            CancelError::Store(store) => ApiError::Store(store),
        }
    }
}

/// FHIR IssueType code and HTTP status of a store error.
fn classify_store(error: &StoreError) -> (StatusCode, &'static str) {
    match error {
        StoreError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
        StoreError::UnsupportedType(_) => (StatusCode::NOT_FOUND, "not-supported"),
        StoreError::UnknownSearchParameter { .. } => (StatusCode::BAD_REQUEST, "not-supported"),
        StoreError::NotFound { .. } => (StatusCode::NOT_FOUND, "not-found"),
        StoreError::Gone { .. } => (StatusCode::GONE, "deleted"),
        StoreError::VersionConflict { .. } => (StatusCode::PRECONDITION_FAILED, "conflict"),
        StoreError::MultipleMatches(_) => (StatusCode::PRECONDITION_FAILED, "multiple-matches"),
        StoreError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        StoreError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "processing"),
        StoreError::TransactionEntry { source, .. } => classify_store(source),
        StoreError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "transient"),
        StoreError::Remote { status, .. } => (
            StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
            if *status >= 500 {
                "exception"
            } else {
                "processing"
            },
        ),
        StoreError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "exception"),
    }
}

/// Status and OperationOutcome for a store error (also used inside
/// batch-response entries).
pub fn status_and_outcome(error: &StoreError) -> (StatusCode, Value) {
    let (status, code) = classify_store(error);
    // A remote server's own OperationOutcome is passed on unchanged.
    if let StoreError::Remote {
        outcome: Some(outcome),
        ..
    } = error
    {
        return (status, outcome.clone());
    }
    let severity = if status.is_server_error() {
        "fatal"
    } else {
        "error"
    };
    let mut outcome = crate::fhir::operation_outcome(severity, code, &error.to_string());
    if let StoreError::TransactionEntry { index, .. } = error {
        outcome["issue"][0]["expression"] = json!([format!("Bundle.entry[{index}]")]);
    }
    (status, outcome)
}

impl ApiError {
    pub fn status_and_outcome(&self) -> (StatusCode, Value) {
        let (status, code) = match self {
            ApiError::Store(e) => return status_and_outcome(e),
            ApiError::Index(crate::index::IndexError::BadQuery { parameter, .. }) => {
                let mut outcome =
                    crate::fhir::operation_outcome("error", "invalid", &self.to_string());
                outcome["issue"][0]["expression"] = json!([parameter]);
                return (StatusCode::BAD_REQUEST, outcome);
            }
            ApiError::Index(crate::index::IndexError::Backend(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "transient")
            }
            ApiError::Index(crate::index::IndexError::Config(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "exception")
            }
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "login"),
            ApiError::NotAcceptable(_) => (StatusCode::NOT_ACCEPTABLE, "not-supported"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "not-supported")
            }
            ApiError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too-long"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "not-supported"),
            ApiError::ServiceUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "transient"),
        };
        let severity = if status.is_server_error() {
            "fatal"
        } else {
            "error"
        };
        (
            status,
            crate::fhir::operation_outcome(severity, code, &self.to_string()),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, outcome) = self.status_and_outcome();
        // A client's query or body may carry phone numbers: never log them whole.
        let logged = crate::telemetry::redact_phones(&self.to_string());
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %logged, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), error = %logged, "request rejected");
        }
        let mut response =
            (status, serde_json::to_vec(&outcome).unwrap_or_default()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"mhero\", Basic realm=\"mhero\""),
            );
        }
        response
    }
}

/// Middleware: an error answered by something other than our handlers (an
/// extractor's rejection such as invalid UTF-8 in a path, a timeout) is
/// turned into an OperationOutcome too. JSON answers are left alone.
pub async fn outcome_for_every_error(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 16 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let diagnostics = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let error = match status.as_u16() {
        400 => ApiError::BadRequest(diagnostics),
        401 => ApiError::Unauthorized(diagnostics),
        404 => ApiError::NotFound(diagnostics),
        405 => ApiError::MethodNotAllowed(diagnostics),
        406 => ApiError::NotAcceptable(diagnostics),
        415 => ApiError::UnsupportedMediaType(diagnostics),
        503 => ApiError::ServiceUnavailable(diagnostics),
        _ if status.is_client_error() => ApiError::BadRequest(diagnostics),
        _ => ApiError::Store(StoreError::Internal(diagnostics)),
    };
    let mut converted = error.into_response();
    *converted.status_mut() = status;
    converted
}

/// Response for a handler that panicked: a 500 OperationOutcome (the
/// process keeps serving).
pub fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked; answered 500");
    ApiError::Store(StoreError::Internal(
        "the server failed while handling this request; it has been logged".into(),
    ))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_fhir_statuses() {
        let cases = [
            (StoreError::Invalid("x".into()), 400),
            (StoreError::UnsupportedType("MedicationRequest".into()), 404),
            (StoreError::not_found("Patient", "1"), 404),
            (
                StoreError::Gone {
                    resource_type: "Patient".into(),
                    id: "1".into(),
                    version_id: "2".into(),
                },
                410,
            ),
            (
                StoreError::VersionConflict {
                    reference: "Patient/1".into(),
                    expected: "1".into(),
                    current: "2".into(),
                },
                412,
            ),
            (StoreError::MultipleMatches("m".into()), 412),
            (StoreError::Unprocessable("u".into()), 422),
            (
                StoreError::Unavailable {
                    backend: "b".into(),
                    reason: "r".into(),
                },
                503,
            ),
        ];
        for (error, expected) in cases {
            let (status, outcome) = status_and_outcome(&error);
            assert_eq!(status.as_u16(), expected, "{error}");
            assert_eq!(outcome["resourceType"], "OperationOutcome");
            assert_eq!(outcome["issue"][0]["diagnostics"], error.to_string());
        }
    }

    #[test]
    fn transaction_failures_point_at_the_entry() {
        let error = StoreError::TransactionEntry {
            index: 3,
            what: "PUT Patient/1".into(),
            source: Box::new(StoreError::Invalid("bad".into())),
        };
        let (status, outcome) = status_and_outcome(&error);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(outcome["issue"][0]["expression"][0], "Bundle.entry[3]");
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains("entry 3")
        );
    }

    #[tokio::test]
    async fn a_panic_becomes_a_500_operation_outcome() {
        let response = panic_response(Box::new("boom"));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let outcome: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(outcome["issue"][0]["code"], "exception");
    }
}
