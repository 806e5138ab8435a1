//! Media types: JSON only. XML (or anything else) in `Content-Type` is a
//! 415, an `Accept` or `_format` that rules out JSON is a 406; both with
//! an OperationOutcome.

use axum::extract::Request;
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

fn is_json_type(media: &str) -> bool {
    let media = media
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    media == "application/fhir+json"
        || media == "application/json"
        || media == "json"
        || media == "application/json+fhir"
}

fn accepts_json(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let media = part
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        is_json_type(&media) || media == "*/*" || media == "application/*" || media.is_empty()
    })
}

pub async fn check_media_types(request: Request, next: Next) -> Response {
    if let Some(error) = media_type_error(&request) {
        return error.into_response();
    }
    next.run(request).await
}

fn media_type_error(request: &Request) -> Option<ApiError> {
    if let Some(query) = request.uri().query() {
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if key == "_format" && !is_json_type(&value) {
                return Some(ApiError::NotAcceptable(format!(
                    "_format={value} is not supported: this server speaks application/fhir+json only"
                )));
            }
        }
    }
    if let Some(accept) = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        && !accepts_json(accept)
    {
        return Some(ApiError::NotAcceptable(format!(
            "Accept: {accept} cannot be served: this server answers application/fhir+json only"
        )));
    }
    let has_body = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH
    );
    if has_body
        && let Some(content_type) = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
    {
        let form = content_type.starts_with("application/x-www-form-urlencoded")
            && request.uri().path().ends_with("/_search");
        if !is_json_type(content_type) && !form {
            return Some(ApiError::UnsupportedMediaType(format!(
                "Content-Type: {content_type} is not supported: send application/fhir+json"
            )));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_variants_are_accepted_and_xml_is_not() {
        assert!(accepts_json("application/fhir+json"));
        assert!(accepts_json("text/html, */*;q=0.8"));
        assert!(accepts_json("application/json; charset=utf-8"));
        assert!(!accepts_json("application/fhir+xml"));
        assert!(is_json_type("application/fhir+json; fhirVersion=4.0"));
        assert!(!is_json_type("application/xml"));
    }
}
