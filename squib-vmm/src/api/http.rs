//! Firecracker's API on the wire: HTTP/1.1 requests framed by `Content-Length`, read one at a
//! time from a stream, and JSON replies.
//!
//! Why `httparse` under a loop of squib's own: Firecracker's clients (curl, its SDKs) send small
//! requests with a `Content-Length`, so a full HTTP stack (hyper, an async runtime) would be all
//! weight. What must not be hand-written is the grammar: a request reader that accepts what a
//! proxy or another server would read differently (`Content-Length : 5`, `+5`, two different
//! lengths) invites request smuggling. So the loop here only cuts the head into bounded lines and
//! reads the body; `httparse` checks the request line and every header against RFC 9112 (tokens,
//! no whitespace before a colon, no line folding, versions 1.0 and 1.1 only), and the framing
//! rules it leaves to its caller are applied strictly on top:
//!
//! - `Content-Length` is decimal digits only, at most [`MAX_BODY`]; repeated, it must repeat the
//!   same value (RFC 9112 §6.3), otherwise the request is refused.
//! - `Transfer-Encoding` of any kind is refused: squib reads no chunked bodies.
//! - `Expect: 100-continue` is answered at once, before the body is read (curl sends it for
//!   bodies over 1 KiB and would otherwise wait a second); any other expectation is refused.
//!
//! Every size is bounded ([`MAX_LINE`], [`MAX_HEADERS`], [`MAX_BODY`]): a hostile client gets
//! [`HttpError::Bad`] (a 400 from the server), never an unbounded allocation. Time is bounded by
//! the caller (the API server in the `squib` binary), whose read timeouts come back here as
//! [`HttpError::Idle`] or [`HttpError::TimedOut`].

use std::io::{self, BufRead, Read, Write};

/// Longest request line or header line accepted: this many bytes before its `\n` (a `\r` counts).
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
    /// The client keeps the connection for another request: HTTP/1.1 without
    /// `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`.
    pub keep_alive: bool,
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The peer closed the connection before sending a byte of a new request.
    #[error("connection closed")]
    Closed,
    /// No byte of a new request arrived before the read timed out.
    #[error("no request arrived in the time allowed")]
    Idle,
    /// A request had begun but was not complete when the read timed out.
    #[error("request not complete in the time allowed")]
    TimedOut,
    /// The request is malformed, cut short or too large.
    #[error("bad request: {0}")]
    Bad(String),
    /// Reading the request (or writing `100 Continue`) failed.
    #[error("reading the request")]
    Io(#[source] io::Error),
}

/// `e`, a failed read, as an [`HttpError`]: a timeout is [`HttpError::Idle`] before the first
/// byte of a request and [`HttpError::TimedOut`] after it.
fn read_failed(e: io::Error, started: bool) -> HttpError {
    match e.kind() {
        // A socket read timeout is EAGAIN (`WouldBlock`) on Unix.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut if started => HttpError::TimedOut,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HttpError::Idle,
        _ => HttpError::Io(e),
    }
}

/// Append one line, `\n` included, to `head`; its length, 0 at the end of the stream.
fn read_line(r: &mut impl BufRead, head: &mut Vec<u8>) -> Result<usize, HttpError> {
    let read = r.take(MAX_LINE as u64 + 1).read_until(b'\n', head);
    let started = !head.is_empty();
    let n = read.map_err(|e| read_failed(e, started))?;
    if n > 0 && !head.ends_with(b"\n") {
        return Err(HttpError::Bad(if n > MAX_LINE {
            format!("a line longer than {MAX_LINE} bytes")
        } else {
            "request cut short in its head".to_owned()
        }));
    }
    Ok(n)
}

fn is_blank(line: &[u8]) -> bool {
    line == b"\n" || line == b"\r\n"
}

/// At most 80 characters of `bytes`, for an error message.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end_matches(['\r', '\n']);
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{:?}...", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// Why `httparse` refused `head` (whose lines end at `ends`), naming the first line it refuses on
/// its own.
fn refusal(head: &[u8], ends: &[usize], e: httparse::Error) -> String {
    let mut start = 0;
    for (i, &end) in ends.iter().enumerate() {
        let line = &head[start..end];
        let mut alone = line.to_vec();
        alone.extend_from_slice(b"\r\n");
        let (what, result) = if i == 0 {
            let result = httparse::Request::new(&mut []).parse(&alone).map(drop);
            ("request line", result)
        } else {
            let result = httparse::parse_headers(&alone, &mut [httparse::EMPTY_HEADER; 1]).map(drop);
            ("header", result)
        };
        if let Err(e) = result {
            return format!("{what} {}: {e}", shown(line));
        }
        start = end;
    }
    format!("request head: {e}")
}

/// `value` of a `Content-Length` header: decimal digits, at most [`MAX_BODY`].
fn content_length(value: &[u8]) -> Result<usize, HttpError> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::Bad(format!(
            "Content-Length {}: not a decimal number",
            shown(value)
        )));
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n <= MAX_BODY)
        .ok_or_else(|| {
            HttpError::Bad(format!(
                "Content-Length {}: a body of more than {MAX_BODY} bytes",
                shown(value)
            ))
        })
}

/// The path of request target `target`, its query dropped: origin-form (`/path?query`), or
/// absolute-form (`http://host/path?query`, which RFC 9112 §3.2.2 has servers accept). The
/// other forms (`*`, `host:port`) and anything not starting with `/` name no API endpoint.
fn request_path(target: &str) -> Result<&str, HttpError> {
    let target = target.split('?').next().unwrap_or_default();
    let scheme = ["http://", "https://"]
        .into_iter()
        .find(|s| target.get(..s.len()).is_some_and(|t| t.eq_ignore_ascii_case(s)));
    if let Some(scheme) = scheme {
        let rest = &target[scheme.len()..];
        return Ok(rest.find('/').map_or("/", |at| &rest[at..]));
    }
    if !target.starts_with('/') {
        return Err(HttpError::Bad(format!(
            "request target {}: not a path starting with /",
            shown(target.as_bytes())
        )));
    }
    Ok(target)
}

/// Read one request from `r` (a client that sends `Expect: 100-continue` waits in vain here:
/// use [`read_request_answering`] on a connection).
///
/// # Errors
/// As [`read_request_answering`].
pub fn read_request(r: &mut impl BufRead) -> Result<Request, HttpError> {
    read_request_answering(r, &mut io::sink())
}

/// Read one request from `r`, answering `Expect: 100-continue` on `w` before reading the body.
///
/// Why: curl sends that header for bodies over 1 KiB and waits (a second by default) for
/// `100 Continue` before sending the body; answering at once keeps such calls fast.
///
/// # Errors
/// [`HttpError::Closed`] at a clean end of stream, [`HttpError::Idle`] or
/// [`HttpError::TimedOut`] when a read times out, [`HttpError::Bad`] for a malformed, cut short
/// or oversized request, [`HttpError::Io`] if reading or writing the interim reply fails.
pub fn read_request_answering(r: &mut impl BufRead, w: &mut impl Write) -> Result<Request, HttpError> {
    // Where each line ends in `head`: at most the request line, MAX_HEADERS and one more.
    let mut ends = Vec::with_capacity(4);
    let mut head = Vec::new();
    if read_line(r, &mut head)? == 0 {
        return Err(HttpError::Closed);
    }
    if is_blank(&head) {
        return Err(HttpError::Bad("empty request line".to_owned()));
    }
    ends.push(head.len());
    loop {
        let start = head.len();
        if read_line(r, &mut head)? == 0 {
            return Err(HttpError::Bad("request cut short in its head".to_owned()));
        }
        if is_blank(&head[start..]) {
            break;
        }
        if ends.len() > MAX_HEADERS {
            return Err(HttpError::Bad(format!("more than {MAX_HEADERS} headers")));
        }
        ends.push(head.len());
    }

    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => return Err(HttpError::Bad("request head: not one complete head".to_owned())),
        Err(e) => return Err(HttpError::Bad(refusal(&head, &ends, e))),
    }
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version) else {
        return Err(HttpError::Bad("request head: no request line".to_owned()));
    };
    let path = request_path(target)?;

    let mut length: Option<usize> = None;
    let mut expect_continue = false;
    let (mut close, mut keep_alive) = (false, false);
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = content_length(h.value)?;
            match length {
                Some(m) if m != n => {
                    return Err(HttpError::Bad(format!(
                        "two different Content-Length headers ({m} and {n})"
                    )));
                }
                _ => length = Some(n),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Bad(format!(
                "Transfer-Encoding {}: not supported (send the body with a Content-Length)",
                shown(h.value)
            )));
        } else if h.name.eq_ignore_ascii_case("expect") {
            if !h.value.eq_ignore_ascii_case(b"100-continue") {
                return Err(HttpError::Bad(format!(
                    "Expect {}: only 100-continue is supported",
                    shown(h.value)
                )));
            }
            expect_continue = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for option in h.value.split(|&b| b == b',') {
                let option = option.trim_ascii();
                close |= option.eq_ignore_ascii_case(b"close");
                keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let length = length.unwrap_or(0);
    if expect_continue && length > 0 {
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .and_then(|()| w.flush())
            .map_err(HttpError::Io)?;
    }
    let mut body = Vec::with_capacity(length);
    let got = r
        .take(length as u64)
        .read_to_end(&mut body)
        .map_err(|e| read_failed(e, true))?;
    if got < length {
        return Err(HttpError::Bad(format!("body cut short: {got} of {length} bytes")));
    }
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        body,
        keep_alive: if version == 1 {
            !close
        } else {
            keep_alive && !close
        },
    })
}

/// Whether the connection stays open after a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// Wait for the next request.
    KeepAlive,
    /// Close after this reply (said in a `Connection: close` header).
    Close,
}

/// A reply: status and optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// JSON body, if any (never sent with a status that has no body: 1xx, 204, 304).
    pub body: Option<String>,
}

/// The reason phrase of `status` (empty for a code squib does not send, as RFC 9112 allows).
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
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

    /// The reply's bytes: status line, headers and body. A status that has no body (1xx, 204,
    /// 304; RFC 9110 §8.6) gets neither `Content-Length` nor a body; every other status gets
    /// `Content-Length`, 0 without a body.
    #[must_use]
    pub fn encode(&self, connection: Connection) -> Vec<u8> {
        let status = self.status;
        let mut out = format!("HTTP/1.1 {status} {}\r\nServer: squib\r\n", reason(status));
        if connection == Connection::Close {
            out.push_str("Connection: close\r\n");
        }
        let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
        match &self.body {
            _ if bodiless => out.push_str("\r\n"),
            Some(body) => {
                out.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ));
            }
            None => out.push_str("Content-Length: 0\r\n\r\n"),
        }
        out.into_bytes()
    }

    /// Write the reply in one piece.
    ///
    /// # Errors
    /// If writing fails.
    pub fn write_to(&self, w: &mut impl Write, connection: Connection) -> io::Result<()> {
        w.write_all(&self.encode(connection))?;
        w.flush()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse(bytes: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut io::BufReader::new(bytes))
    }

    fn refused(bytes: &[u8], why: &str) {
        match parse(bytes) {
            Err(HttpError::Bad(m)) => {
                assert!(m.contains(why), "{:?}: {m:?} does not say {why:?}", shown(bytes))
            }
            other => panic!(
                "{:?}: expected a refusal saying {why:?}, got {other:?}",
                shown(bytes)
            ),
        }
    }

    /// A reply parsed by httparse (not by squib): status, headers, and what follows the head.
    fn parse_reply(bytes: &[u8]) -> (u16, Vec<(String, String)>, &[u8]) {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut reply = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(n) = reply.parse(bytes).expect("a valid reply") else {
            panic!("reply head incomplete: {:?}", shown(bytes));
        };
        let headers = reply
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        (reply.code.expect("status"), headers, &bytes[n..])
    }

    #[test]
    fn test_should_read_a_put_with_its_body() {
        let r = parse(b"PUT /machine-config?x=1 HTTP/1.1\r\nHost: localhost\r\ncontent-length: 17\r\n\r\n{\"vcpu_count\": 2}")
            .unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/machine-config");
        assert_eq!(r.body, b"{\"vcpu_count\": 2}");
        assert!(r.keep_alive);
    }

    #[test]
    fn test_should_take_the_path_of_an_absolute_form_target() {
        let path = |target: &str| {
            parse(format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes())
                .unwrap()
                .path
        };
        assert_eq!(path("http://localhost/vm?x=1"), "/vm");
        assert_eq!(path("HTTP://localhost"), "/");
        assert_eq!(path("http://localhost?a/b"), "/");
        assert_eq!(path("/snapshot/create?"), "/snapshot/create");
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
        refused(b"PUT / HTTP/1.1\r\nExpect: something-else\r\n\r\n", "Expect");
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
        refused(huge.as_bytes(), "body");
        refused(
            b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "body",
        );
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE + 10));
        refused(long.as_bytes(), "longer than");
        refused(b"GET /\r\n\r\n", "request line");
        refused(b"GET / HTTP/2.0\r\n\r\n", "request line");
        refused(b"GET  / HTTP/1.1\r\n\r\n", "request line");
        refused(b"\r\nGET / HTTP/1.1\r\n\r\n", "empty request line");
        refused(b"GET ?x=1 HTTP/1.1\r\n\r\n", "request target \"\": not a path");
        refused(b"OPTIONS * HTTP/1.1\r\n\r\n", "request target \"*\": not a path");
        refused(b"CONNECT localhost:80 HTTP/1.1\r\n\r\n", "request target");
        refused(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "Content-Length");
        refused(b"PUT / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n", "Content-Length");
        refused(b"PUT / HTTP/1.1\r\nContent-Length: 2,2\r\n\r\n", "Content-Length");
        refused(b"PUT / HTTP/1.1\r\nContent-Length:\r\n\r\n", "Content-Length");
        refused(
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding",
        );
        refused(
            b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: identity\r\n\r\n{}",
            "Transfer-Encoding",
        );
        refused(b"PUT / HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n", "header");
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(MAX_HEADERS + 1));
        refused(many.as_bytes(), "headers");
        // Exactly at the bounds is fine.
        let most = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(MAX_HEADERS));
        assert!(parse(most.as_bytes()).is_ok());
        let widest = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE - 15));
        assert_eq!(
            widest.find('\n'),
            Some(MAX_LINE),
            "the line is MAX_LINE bytes and its LF"
        );
        assert!(parse(widest.as_bytes()).is_ok());
        let wider = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE - 14));
        refused(wider.as_bytes(), "longer than");
        let full = format!(
            "PUT / HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n{}",
            "x".repeat(MAX_BODY)
        );
        assert_eq!(parse(full.as_bytes()).unwrap().body.len(), MAX_BODY);
        // Cut short: a 400, whether in the head or the body (never a wait for more).
        refused(
            b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
            "body cut short: 3 of 10",
        );
        refused(b"PUT / HTTP/1.1\r\nContent-Len", "cut short");
        refused(b"PUT / HTTP/1.1\r\n", "cut short");
    }

    // The framing defects an outside review found in the hand-written reader: each was accepted.

    #[test]
    fn test_should_refuse_whitespace_before_a_header_colon() {
        refused(
            b"PUT / HTTP/1.1\r\nContent-Length : 2\r\n\r\n{}",
            "header \"Content-Length : 2\"",
        );
        refused(b"PUT / HTTP/1.1\r\nContent-Length\t: 2\r\n\r\n{}", "header");
    }

    #[test]
    fn test_should_refuse_two_different_content_lengths() {
        refused(
            b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 2\r\n\r\n{}",
            "two different Content-Length headers (5 and 2)",
        );
        // The same length twice frames the body one way only (RFC 9112 6.3 lets a server accept it).
        let r = parse(b"PUT / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 02\r\n\r\n{}").unwrap();
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn test_should_refuse_a_signed_content_length() {
        refused(
            b"PUT / HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
            "Content-Length \"+2\": not a decimal number",
        );
    }

    #[test]
    fn test_should_send_no_content_length_with_204() {
        let bytes = Response::no_content().encode(Connection::KeepAlive);
        let (status, headers, rest) = parse_reply(&bytes);
        assert_eq!(status, 204);
        assert!(!headers.iter().any(|(n, _)| n == "content-length"), "{headers:?}");
        assert!(rest.is_empty());
        // Even a 204 given a body sends none.
        let odd = Response {
            status: 204,
            body: Some("{}".to_owned()),
        };
        let bytes = odd.encode(Connection::Close);
        let (_, headers, rest) = parse_reply(&bytes);
        assert!(rest.is_empty());
        assert!(headers.contains(&("connection".to_owned(), "close".to_owned())));
    }

    #[test]
    fn test_should_frame_every_other_status_by_its_content_length() {
        let replies = [
            Response::ok("{\"state\": \"Running\"}".to_owned()),
            Response::fault(400, "bad \"vcpu_count\""),
            Response::fault(404, "no such endpoint"),
            Response::fault(405, "method not allowed"),
            Response::fault(408, "too slow"),
            Response::fault(503, "busy"),
            Response::fault(599, "odd"),
            Response {
                status: 200,
                body: None,
            },
        ];
        for reply in replies {
            let bytes = reply.encode(Connection::KeepAlive);
            let (status, headers, rest) = parse_reply(&bytes);
            assert_eq!(status, reply.status);
            let length: Vec<&str> = headers
                .iter()
                .filter(|(n, _)| n == "content-length")
                .map(|(_, v)| v.as_str())
                .collect();
            let body = reply.body.clone().unwrap_or_default();
            assert_eq!(length, [body.len().to_string()], "{reply:?}");
            assert_eq!(rest, body.as_bytes());
        }
    }

    #[test]
    fn test_should_write_fault_in_firecracker_shape() {
        let mut out = Vec::new();
        Response::fault(400, "bad \"vcpu_count\"")
            .write_to(&mut out, Connection::Close)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["fault_message"], "bad \"vcpu_count\"");
    }

    #[test]
    fn test_should_keep_alive_as_the_version_and_connection_header_say() {
        let keep = |head: &str| parse(head.as_bytes()).unwrap().keep_alive;
        assert!(keep("GET / HTTP/1.1\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.1\r\nConnection: Upgrade, Close\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.0\r\n\r\n"));
        assert!(keep("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    }

    /// `req` is within the bounds, names a path, and reads back the same when written plainly.
    fn sound(req: &Request) -> bool {
        let mut plain = format!(
            "{} {} HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            req.method,
            req.path,
            req.body.len()
        )
        .into_bytes();
        plain.extend_from_slice(&req.body);
        req.body.len() <= MAX_BODY
            && req.path.starts_with('/')
            && parse(&plain).is_ok_and(|back| {
                (back.method, back.path, back.body)
                    == (req.method.clone(), req.path.clone(), req.body.clone())
            })
    }

    /// A header name: an RFC 9110 token, never one of those the reader interprets.
    fn header_name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}".prop_filter("a header the reader interprets", |n| {
            !["content-length", "transfer-encoding", "expect", "connection"]
                .contains(&n.to_ascii_lowercase().as_str())
        })
    }

    /// One framing defect, spliced into a valid request head (the `&str` names it for messages).
    fn defect() -> impl Strategy<Value = (&'static str, String)> {
        prop_oneof![
            (1usize..=MAX_BODY).prop_map(|n| ("space before colon", format!("Content-Length : {n}\r\n"))),
            (0usize..1000, 1usize..1000).prop_map(|(a, b)| (
                "conflicting lengths",
                format!("Content-Length: {a}\r\nContent-Length: {}\r\n", a + b)
            )),
            (0usize..1000).prop_map(|n| ("signed length", format!("Content-Length: +{n}\r\n"))),
            (0usize..1000).prop_map(|n| ("negative length", format!("Content-Length: -{n}\r\n"))),
            (MAX_BODY + 1..usize::MAX).prop_map(|n| ("oversize body", format!("Content-Length: {n}\r\n"))),
            "(chunked|gzip|identity|chunked, gzip)"
                .prop_map(|t| ("transfer encoding", format!("Transfer-Encoding: {t}\r\n"))),
            Just(("oversize line", format!("X-Long: {}\r\n", "v".repeat(MAX_LINE)))),
            Just(("too many headers", "X: y\r\n".repeat(MAX_HEADERS + 1))),
            "[ \t]{1,3}".prop_map(|w| ("folded line", format!("X-A: b\r\n{w}c\r\n"))),
            Just(("bare CR", "X-A: b\rc\r\n".to_owned())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Arbitrary bytes: a request, a 400 or a clean end; never a panic, never an I/O error
        /// from an in-memory stream, and every request within the bounds.
        #[test]
        fn test_should_never_panic_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            capacity in 1usize..64,
        ) {
            let mut r = io::BufReader::with_capacity(capacity, &bytes[..]);
            for _ in 0..8 {
                match read_request(&mut r) {
                    Ok(req) => prop_assert!(sound(&req), "{:?}", req),
                    Err(HttpError::Closed | HttpError::Bad(_)) => break,
                    Err(e) => prop_assert!(false, "{e:?}"),
                }
            }
        }

        /// Request-shaped input with mutations near the framing: the same outcomes.
        #[test]
        fn test_should_never_panic_on_mutated_requests(
            cuts in proptest::collection::vec((0usize..200, any::<u8>()), 0..8),
        ) {
            let mut bytes = b"PUT /snapshot/create HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n{\"a\": \"bcd\"}GET / HTTP/1.1\r\n\r\n".to_vec();
            for (at, b) in cuts {
                let at = at % bytes.len();
                bytes[at] = b;
            }
            let mut r = io::BufReader::new(&bytes[..]);
            for _ in 0..4 {
                match read_request(&mut r) {
                    Ok(req) => prop_assert!(sound(&req), "{:?}", req),
                    Err(HttpError::Closed | HttpError::Bad(_)) => break,
                    Err(e) => prop_assert!(false, "{e:?}"),
                }
            }
        }

        /// A valid request as a client would send it reads back as the generator made it.
        #[test]
        fn test_should_read_what_a_valid_request_says(
            method in "(GET|PUT|PATCH|POST|DELETE)",
            path in "(/[a-z0-9_-]{0,12}){1,4}",
            query in proptest::option::of("[a-z0-9=&]{0,16}"),
            headers in proptest::collection::vec((header_name(), "[ -~]{0,40}"), 0..MAX_HEADERS - 1),
            body in proptest::collection::vec(any::<u8>(), 0..4096),
            bare_lf in any::<bool>(),
            capacity in 1usize..256,
        ) {
            let eol = if bare_lf { "\n" } else { "\r\n" };
            let target = match &query { Some(q) => format!("{path}?{q}"), None => path.clone() };
            let mut text = format!("{method} {target} HTTP/1.1{eol}");
            for (name, value) in &headers {
                text.push_str(&format!("{name}: {value}{eol}"));
            }
            text.push_str(&format!("Content-Length: {}{eol}{eol}", body.len()));
            let mut bytes = text.into_bytes();
            bytes.extend_from_slice(&body);
            let req = read_request(&mut io::BufReader::with_capacity(capacity, &bytes[..]));
            prop_assert!(req.is_ok(), "{:?}", req);
            let req = req.unwrap();
            prop_assert_eq!(req.method, method);
            prop_assert_eq!(req.path, path);
            prop_assert_eq!(req.body, body);
            prop_assert!(req.keep_alive);
        }

        /// A valid request with one framing defect spliced in among its headers is refused.
        #[test]
        fn test_should_refuse_every_framing_defect(
            (name, bad) in defect(),
            before in proptest::collection::vec((header_name(), "[!-~]{0,20}"), 0..4),
        ) {
            let mut text = "PUT /vm HTTP/1.1\r\n".to_owned();
            for (n, v) in &before {
                text.push_str(&format!("{n}: {v}\r\n"));
            }
            text.push_str(&bad);
            text.push_str("\r\n{}");
            let got = parse(text.as_bytes());
            prop_assert!(matches!(got, Err(HttpError::Bad(_))), "{}: {:?}", name, got);
        }
    }
}
