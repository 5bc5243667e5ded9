//! Optional bearer-token auth for the NegativeMiner service. The token comes from the
//! HARDNEG_AUTH_TOKEN environment variable or from `server.auth_token_file`; requests must
//! carry `authorization: Bearer <token>`, compared in constant time. Never logged.
use std::sync::Arc;

use tonic::{Request, Status};

/// Environment variable holding the token (wins over `server.auth_token_file`).
pub const TOKEN_ENV: &str = "HARDNEG_AUTH_TOKEN";

/// The configured token, if any.
pub fn load_token(file: &std::path::Path) -> anyhow::Result<Option<Arc<[u8]>>> {
    if let Ok(token) = std::env::var(TOKEN_ENV) {
        if !token.trim().is_empty() {
            return Ok(Some(Arc::from(token.trim().as_bytes())));
        }
    }
    if file.as_os_str().is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("server.auth_token_file: {}: {e}", file.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        anyhow::bail!("server.auth_token_file: {} holds no token", file.display());
    }
    Ok(Some(Arc::from(token.as_bytes())))
}

/// Equal length and bytes, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks each request's bearer token when one is configured.
#[derive(Clone)]
pub struct Auth(pub Option<Arc<[u8]>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else { return Ok(request) };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if constant_time_eq(g.trim().as_bytes(), token) => Ok(request),
            Some(_) => {
                metrics::counter!(crate::metrics::REJECTED, "reason" => "unauthenticated").increment(1);
                Err(Status::unauthenticated("the bearer token is wrong"))
            }
            None => {
                metrics::counter!(crate::metrics::REJECTED, "reason" => "unauthenticated").increment(1);
                Err(Status::unauthenticated("this server needs `authorization: Bearer <token>`"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn tokens_are_checked_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        let mut auth = Auth(Some(Arc::from(&b"s3cret"[..])));
        let with = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("authorization", v.parse().unwrap());
            r
        };
        assert!(auth.call(with("Bearer s3cret")).is_ok());
        assert_eq!(auth.call(with("Bearer nope")).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(auth.call(with("s3cret")).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(auth.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(Auth(None).call(Request::new(())).is_ok(), "no token configured: open");
    }
}
