//! Just enough HTTP/1.1 for Firecracker's API: one request at a time on a
//! stream, `Content-Length` bodies, JSON replies.
//!
//! Firecracker's clients (curl, its SDKs) send small requests with a
//! `Content-Length`; nothing else is needed, so squib carries no HTTP stack.
//! Every size is bounded: a hostile client gets a 400 and a closed
//! connection, never an unbounded allocation.

use std::io::{self, BufRead, Read, Write};

/// Longest request line or header line accepted.
pub const MAX_LINE: usize = 8 * 1024;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 64;
/// Largest body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, `PATCH`...
    pub method: String,
    /// The path, query string removed.
    pub path: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The peer closed the connection between requests.
    #[error("connection closed")]
    Closed,
    /// The request is malformed or too large.
    #[error("bad request: {0}")]
    Bad(String),
    /// Reading failed.
    #[error("reading the request")]
    Io(#[from] io::Error),
}

fn read_line(r: &mut impl BufRead) -> Result<Option<String>, HttpError> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if !buf.ends_with(b"\n") {
        return Err(HttpError::Bad(format!(
            "line longer than {MAX_LINE} bytes or cut short"
        )));
    }
    buf.pop();
    if buf.ends_with(b"\r") {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| HttpError::Bad("line is not UTF-8".to_owned()))
}

/// Read one request from `r` (a client that sends `Expect: 100-continue` waits in vain here:
/// use [`read_request_answering`] on a connection).
///
/// # Errors
/// [`HttpError::Closed`] at a clean end of stream, [`HttpError::Bad`] for a
/// malformed or oversized request, [`HttpError::Io`] if reading fails.
#[cfg(test)]
pub fn read_request(r: &mut impl BufRead) -> Result<Request, HttpError> {
    read_request_answering(r, &mut io::sink())
}

/// Read one request from `r`, answering `Expect: 100-continue` on `w` before reading the body.
///
/// Why: curl sends that header for bodies over 1 KiB and waits (a second by default) for
/// `100 Continue` before sending the body; answering at once keeps such calls fast.
///
/// # Errors
/// As `read_request`; also [`HttpError::Io`] if the interim reply cannot be written.
pub fn read_request_answering(r: &mut impl BufRead, w: &mut impl Write) -> Result<Request, HttpError> {
    let line = read_line(r)?.ok_or(HttpError::Closed)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Bad(format!("request line {line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Bad(format!("version {version:?}")));
    }
    let path = target.split('?').next().unwrap_or("").to_owned();
    let mut content_length = 0usize;
    let mut expect_continue = false;
    let mut headers = 0;
    loop {
        let line = read_line(r)?.ok_or_else(|| HttpError::Bad("headers cut short".to_owned()))?;
        if line.is_empty() {
            break;
        }
        headers += 1;
        if headers > MAX_HEADERS {
            return Err(HttpError::Bad(format!("more than {MAX_HEADERS} headers")));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| HttpError::Bad(format!("header {line:?}")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| HttpError::Bad(format!("Content-Length {value:?}")))?;
            if content_length > MAX_BODY {
                return Err(HttpError::Bad(format!(
                    "body of {content_length} bytes (at most {MAX_BODY})"
                )));
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(HttpError::Bad(format!("Expect {value:?}")));
            }
            expect_continue = true;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Bad(format!("Transfer-Encoding {value:?}")));
        }
    }
    if expect_continue && content_length > 0 {
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        w.flush()?;
    }
    let mut body = vec![0u8; content_length];
    r.read_exact(&mut body)?;
    Ok(Request {
        method: method.to_owned(),
        path,
        body,
    })
}

/// A reply: status and optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<String>,
}

impl Response {
    /// 204 No Content.
    #[must_use]
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// 200 with a JSON body.
    #[must_use]
    pub fn ok(body: String) -> Self {
        Self {
            status: 200,
            body: Some(body),
        }
    }

    /// An error in Firecracker's shape: `{"fault_message": "..."}`.
    #[must_use]
    pub fn fault(status: u16, message: &str) -> Self {
        Self {
            status,
            body: Some(serde_json::json!({ "fault_message": message }).to_string()),
        }
    }

    /// Write the reply.
    ///
    /// # Errors
    /// If writing fails.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Internal Server Error",
        };
        write!(w, "HTTP/1.1 {} {reason}\r\nServer: squib\r\n", self.status)?;
        match &self.body {
            Some(b) => write!(
                w,
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )?,
            None => write!(w, "Content-Length: 0\r\n\r\n")?,
        }
        w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut io::BufReader::new(bytes))
    }

    #[test]
    fn test_should_read_a_put_with_its_body() {
        let r = parse(b"PUT /machine-config?x=1 HTTP/1.1\r\nHost: localhost\r\ncontent-length: 17\r\n\r\n{\"vcpu_count\": 2}")
            .unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/machine-config");
        assert_eq!(r.body, b"{\"vcpu_count\": 2}");
    }

    #[test]
    fn test_should_answer_expect_100_continue_before_reading_the_body() {
        let mut out = Vec::new();
        let r = read_request_answering(
            &mut io::BufReader::new(
                &b"PUT /snapshot/create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}"[..],
            ),
            &mut out,
        )
        .unwrap();
        assert_eq!(r.body, b"{}");
        assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
        let mut out = Vec::new();
        read_request_answering(&mut io::BufReader::new(&b"GET / HTTP/1.1\r\n\r\n"[..]), &mut out).unwrap();
        assert!(out.is_empty(), "no interim reply without the header");
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nExpect: something-else\r\n\r\n"),
            Err(HttpError::Bad(m)) if m.contains("Expect")
        ));
    }

    #[test]
    fn test_should_read_two_requests_from_one_stream() {
        let mut s = io::BufReader::new(
            &b"GET / HTTP/1.1\r\n\r\nPATCH /vm HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"[..],
        );
        assert_eq!(read_request(&mut s).unwrap().path, "/");
        assert_eq!(read_request(&mut s).unwrap().method, "PATCH");
        assert!(matches!(read_request(&mut s), Err(HttpError::Closed)));
    }

    #[test]
    fn test_should_refuse_oversized_and_malformed_requests() {
        let huge = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert!(matches!(parse(huge.as_bytes()), Err(HttpError::Bad(m)) if m.contains("body")));
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE + 10));
        assert!(matches!(parse(long.as_bytes()), Err(HttpError::Bad(_))));
        assert!(matches!(parse(b"GET /\r\n\r\n"), Err(HttpError::Bad(_))));
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(HttpError::Bad(m)) if m.contains("Content-Length")
        ));
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HttpError::Bad(_))
        ));
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(MAX_HEADERS + 1));
        assert!(matches!(parse(many.as_bytes()), Err(HttpError::Bad(m)) if m.contains("headers")));
        // A body shorter than announced is an I/O error (unexpected end), not a hang.
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
            Err(HttpError::Io(_))
        ));
    }

    #[test]
    fn test_should_write_fault_in_firecracker_shape() {
        let mut out = Vec::new();
        Response::fault(400, "bad \"vcpu_count\"")
            .write_to(&mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["fault_message"], "bad \"vcpu_count\"");
    }
}
