//! Responses: success bodies and JSON errors that name the problem.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

use crate::ingest::IngestError;
use crate::spool::SpoolError;

pub type Reply = Response<Full<Bytes>>;

/// An error answer of the local API.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_secs: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn into_reply(self) -> Reply {
        let body =
            serde_json::json!({ "success": false, "error": self.code, "message": self.message });
        let mut r = json(self.status, &body);
        if let Some(secs) = self.retry_after_secs {
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"edge-agent\""),
            );
        }
        r
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Malformed(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
            }
            IngestError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
            }
        }
    }
}

impl From<SpoolError> for ApiError {
    fn from(e: SpoolError) -> Self {
        let message = e.to_string();
        match e {
            SpoolError::LaneFull { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "lane_full", message).retry_after(1)
            }
            SpoolError::DiskFull(_) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", message)
            }
            SpoolError::Unavailable(_) | SpoolError::Closed => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
                    .retry_after(1)
            }
            SpoolError::UnknownLane(_) | SpoolError::Storage(_) | SpoolError::Corrupt(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", message)
            }
        }
    }
}

pub fn json(status: StatusCode, body: &impl serde::Serialize) -> Reply {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    with_type(status, "application/json", Bytes::from(bytes))
}

pub fn with_type(status: StatusCode, content_type: &'static str, body: Bytes) -> Reply {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
