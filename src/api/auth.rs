//! API key authentication: `Authorization: Bearer <key>` or HTTP Basic
//! with the key as password, compared in constant time against every
//! configured key. With no keys configured every request passes (the
//! server then refuses to listen beyond loopback; see `config.rs`).

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use subtle::ConstantTimeEq;

use super::AppState;
use crate::config::Secret;
use crate::error::ApiError;

/// The key a request presents, if any.
fn presented_key(request: &Request) -> Option<String> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, credentials) = value.split_once(' ')?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(credentials.to_string())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        text.split_once(':')
            .map(|(_, password)| password.to_string())
    } else {
        None
    }
}

/// True if `candidate` equals one of `keys`; every key is compared, in
/// constant time, so timing does not tell which key (or how much) matched.
pub fn key_matches(keys: &[Secret], candidate: &str) -> bool {
    let mut matched = subtle::Choice::from(0u8);
    for key in keys {
        matched |= key.expose().as_bytes().ct_eq(candidate.as_bytes());
    }
    matched.into()
}

pub fn check(state: &AppState, request: &Request) -> Result<(), ApiError> {
    let keys = &state.settings.auth.api_keys;
    if keys.is_empty() {
        return Ok(());
    }
    match presented_key(request) {
        Some(key) if key_matches(keys, &key) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized("the API key is not valid".into())),
        None => Err(ApiError::Unauthorized(
            "authentication required: send Authorization: Bearer <api key> (or HTTP Basic with the key as password)".into(),
        )),
    }
}

pub async fn require_api_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match check(&state, &request) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_keys_match() {
        let keys = vec![Secret::new("alpha"), Secret::new("beta")];
        assert!(key_matches(&keys, "beta"));
        assert!(!key_matches(&keys, "bet"));
        assert!(!key_matches(&keys, ""));
        assert!(!key_matches(&[], "alpha"));
    }

    #[test]
    fn bearer_and_basic_carry_the_key() {
        let bearer = Request::builder()
            .header("authorization", "Bearer k1")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(presented_key(&bearer).as_deref(), Some("k1"));
        let encoded = base64::engine::general_purpose::STANDARD.encode("ihris:k2");
        let basic = Request::builder()
            .header("authorization", format!("Basic {encoded}"))
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(presented_key(&basic).as_deref(), Some("k2"));
        let garbage = Request::builder()
            .header("authorization", "Basic !!!")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(presented_key(&garbage), None);
    }
}
