//! Answers of the management API: JSON bodies (pretty, `Cache-Control: no-store`) for success
//! ([`Reply`]) and refusal ([`ApiError`], the `sealgate-api` error body), and the mapping of
//! the daemon's errors to a status and a check name.

use axum::body::Body;
use axum::http::StatusCode;
use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::control::ControlError;
use crate::delivery::AdminError;
use sealgate_core::site::SiteError;

/// A refusal: HTTP status, a short machine-readable check name, and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub check: &'static str,
    pub error: String,
}

impl ApiError {
    pub fn new(status: StatusCode, check: &'static str, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            check,
            error: error.into(),
        }
    }
}

/// The reason of a refusal, carried on its response for the request log.
#[derive(Debug, Clone)]
pub(super) struct LoggedError(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = sealgate_api::ErrorBody {
            error: self.error,
            check: self.check.to_string(),
        };
        let mut r = json_response(self.status, &body);
        r.extensions_mut().insert(LoggedError(body.error));
        r
    }
}

/// A successful answer: status and body.
#[derive(Debug)]
pub(super) struct Reply<T>(pub StatusCode, pub T);

impl<T> Reply<T> {
    pub fn ok(body: T) -> Reply<T> {
        Reply(StatusCode::OK, body)
    }
}

impl<T: Serialize> IntoResponse for Reply<T> {
    fn into_response(self) -> Response {
        json_response(self.0, &self.1)
    }
}

/// `body` as pretty JSON with a final newline; `401` carries `WWW-Authenticate`.
fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    text.push(b'\n');
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"sealgate\""),
        );
    }
    r
}

pub(super) fn internal(e: &dyn std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

pub(super) fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "size",
        format!("request body larger than {max} bytes"),
    )
}

/// The HTTP answer to a refused config: which check failed and the reason.
pub fn config_refusal(e: &ControlError) -> ApiError {
    use sealgate_core::blob::BlobError as B;
    let unprocessable =
        |check: &'static str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, check, e.to_string());
    match e {
        ControlError::Site(SiteError::Blob(b)) => unprocessable(match b {
            B::Truncated
            | B::BadMagic
            | B::UnsupportedFormat(_)
            | B::TooLarge
            | B::TrailingBytes(_)
            | B::LengthMismatch { .. }
            | B::Malformed(_) => "format",
            B::UnknownKey(_) | B::BadSignature => "signature",
            B::WrongDevice { .. } => "device",
            B::Replayed { .. } | B::SameSequenceDifferentContent(_) => "sequence",
            B::NotYetValid { .. } | B::Expired { .. } => "time-window",
            B::NeedsFirmware { .. } => "firmware",
            B::LastKeyRetired => "key-rotation",
        }),
        ControlError::Site(SiteError::Config(_)) => unprocessable("semantic"),
        ControlError::Site(SiteError::NotProvisioned) => unprocessable("provisioning"),
        ControlError::Site(SiteError::Secret(_) | SiteError::MissingSecret { .. }) => {
            unprocessable("secrets")
        }
        ControlError::Apply(_) => unprocessable("apply"),
        ControlError::NoStore => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "sealed-store",
            e.to_string(),
        ),
        _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "record", e.to_string()),
    }
}

/// The HTTP answer to a queue operation that was not done.
pub(super) fn queue_refusal(id: &str, e: AdminError) -> ApiError {
    let (status, check) = match &e {
        AdminError::NotFound => (StatusCode::NOT_FOUND, "queue-id"),
        AdminError::InFlight => (StatusCode::CONFLICT, "in-flight"),
        AdminError::Spool(_) => (StatusCode::INTERNAL_SERVER_ERROR, "spool"),
    };
    ApiError::new(status, check, format!("{id}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_check() {
        use sealgate_core::blob::BlobError;
        let cases = [
            (BlobError::BadSignature, "signature"),
            (BlobError::Replayed { blob: 1, stored: 2 }, "sequence"),
            (BlobError::Truncated, "format"),
            (
                BlobError::Expired {
                    not_after: 0,
                    now: 1,
                },
                "time-window",
            ),
        ];
        for (b, check) in cases {
            let e = config_refusal(&ControlError::Site(SiteError::Blob(b.clone())));
            assert_eq!(
                (e.status, e.check),
                (StatusCode::UNPROCESSABLE_ENTITY, check)
            );
            assert_eq!(e.error, b.to_string());
        }
        assert_eq!(
            config_refusal(&ControlError::NoStore).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn answers_are_json_and_not_cached() {
        let r = ApiError::new(StatusCode::UNAUTHORIZED, "auth", "no").into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let h = r.headers();
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
        assert_eq!(h[header::WWW_AUTHENTICATE], "Bearer realm=\"sealgate\"");
        assert_eq!(r.extensions().get::<LoggedError>().unwrap().0, "no");
        let r = Reply::ok(sealgate_api::Rebooting { rebooting: true }).into_response();
        assert!(!r.headers().contains_key(header::WWW_AUTHENTICATE));
    }
}
