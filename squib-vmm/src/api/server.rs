//! Serving the API's connections: how many at once, and how long a client may take.
//!
//! Why bounds: each connection is served by a thread of its own with blocking reads (the API sees
//! a handful of local clients; an event loop would be more code for nothing), so a client that
//! connects and says nothing, or stops halfway through a request, would otherwise hold a thread
//! for ever, and enough of them would exhaust the process. Firecracker serves one API connection
//! at a time; squib allows a few (a controller, a monitor, a script), so that one slow client does
//! not lock the others out, while requests are still applied one at a time against one `Vmm`:
//!
//! - At most [`Limits::max_connections`] ([`MAX_CONNECTIONS`] by default) connections are served
//!   at once. A client beyond that waits up to [`Limits::slot_wait`] for one to close, then gets a
//!   `503` with a `fault_message` naming the bound, and a closed connection.
//! - A request must arrive whole within [`Limits::request_timeout`] of when the server starts
//!   waiting for it. The read timeout is re-armed before every read with the time left, so a
//!   client dripping a byte at a time is cut off as surely as a silent one. A connection with no
//!   request begun is closed quietly (an idle keep-alive connection too); a request begun and not
//!   finished gets a `408`.
//! - Replies, and `100 Continue`, are written with [`Limits::write_timeout`]: a client that never
//!   reads cannot hold its thread either.
//! - Malformed framing (see `squib_vmm::api::http`) gets one `400` with a `fault_message`, and the
//!   connection is closed: after a framing error nobody can tell where a next request would begin.
//!
//! A connection closed after such an answer first shuts down its sending side, then reads and
//! discards what the client sent for at most [`LINGER`] (and [`LINGER_BYTES`]): the client reads
//! the answer and then an end of stream, not a reset (closing a Unix socket that holds unread data
//! resets its peer).

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::http::{Connection, HttpError, Request, Response, read_request_answering};

/// Connections served at once by default (Firecracker serves one).
pub const MAX_CONNECTIONS: usize = 4;
/// Time a request may take to arrive, from when the server starts waiting for it, by default.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a reply may take to be written, by default.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client beyond the bound waits for a connection to close, by default.
pub const SLOT_WAIT: Duration = Duration::from_secs(1);
/// Longest time spent reading and discarding what a client sent after a closing answer.
pub const LINGER: Duration = Duration::from_secs(1);
/// Most bytes read and discarded after a closing answer.
pub const LINGER_BYTES: u64 = 1 << 20;

/// The bounds of an API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once (at least 1).
    pub max_connections: usize,
    /// Time a request may take to arrive whole, from when the server starts waiting for it.
    pub request_timeout: Duration,
    /// Time a reply may take to be written.
    pub write_timeout: Duration,
    /// Time a client beyond `max_connections` waits for a connection to close before a `503`.
    pub slot_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            request_timeout: REQUEST_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            slot_wait: SLOT_WAIT,
        }
    }
}

/// `d` from now (far in the future if that overflows).
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// The connections being served, against the bound.
struct Slots {
    busy: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

/// One connection's place under the bound, given back when dropped.
struct Slot(Arc<Slots>);

impl Slots {
    /// A place under the bound, waiting up to `wait` for one to be given back.
    fn take(self: &Arc<Self>, wait: Duration) -> Option<Slot> {
        let deadline = after(wait);
        let mut busy = self.busy.lock();
        while *busy >= self.max {
            if self.freed.wait_until(&mut busy, deadline).timed_out() && *busy >= self.max {
                return None;
            }
        }
        *busy += 1;
        Some(Slot(Arc::clone(self)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.busy.lock() -= 1;
        self.0.freed.notify_one();
    }
}

/// A stream whose reads fail with a timeout once `until` has passed.
struct Deadline {
    stream: UnixStream,
    until: Instant,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Shut down the sending side, then read and discard what the peer sends for a bounded time.
fn linger(reader: &mut BufReader<Deadline>) {
    let _ = reader.get_ref().stream.shutdown(Shutdown::Write);
    reader.get_mut().until = after(LINGER);
    let _ = io::copy(&mut reader.take(LINGER_BYTES), &mut io::sink());
}

/// Answer a client beyond the bound with a `503`, and close.
fn refuse(stream: UnixStream, limits: &Limits) {
    let reply = Response::fault(
        503,
        &format!(
            "squib serves at most {} API connections at a time and all are busy: retry once one \
             has closed",
            limits.max_connections
        ),
    );
    tracing::debug!(
        "API connection refused: {} connections busy",
        limits.max_connections
    );
    if stream
        .set_write_timeout(Some(limits.write_timeout.min(LINGER)))
        .is_err()
        || (&stream).write_all(&reply.encode(Connection::Close)).is_err()
    {
        return;
    }
    linger(&mut BufReader::new(Deadline {
        stream,
        until: Instant::now(),
    }));
}

/// Serve requests on `stream` until the client closes, errs, or times out.
fn serve_connection<H: Fn(&Request) -> Response>(stream: UnixStream, limits: &Limits, handler: &H) {
    let writer = stream
        .set_write_timeout(Some(limits.write_timeout))
        .and_then(|()| stream.try_clone());
    let Ok(mut writer) = writer else {
        return;
    };
    let mut reader = BufReader::new(Deadline {
        stream,
        until: Instant::now(),
    });
    loop {
        reader.get_mut().until = after(limits.request_timeout);
        let (reply, connection) = match read_request_answering(&mut reader, &mut writer) {
            Ok(req) => {
                let connection = if req.keep_alive {
                    Connection::KeepAlive
                } else {
                    Connection::Close
                };
                (handler(&req), connection)
            }
            Err(HttpError::Closed | HttpError::Idle) => return,
            Err(e @ HttpError::Io(_)) => {
                tracing::debug!("API connection: {e}");
                return;
            }
            Err(e @ HttpError::TimedOut) => {
                let message = format!("{e} ({})", humantime::format_duration(limits.request_timeout));
                tracing::debug!("API connection: {message}");
                (Response::fault(408, &message), Connection::Close)
            }
            Err(e @ HttpError::Bad(_)) => {
                tracing::debug!("API connection: {e}");
                (Response::fault(400, &e.to_string()), Connection::Close)
            }
        };
        if reply.write_to(&mut writer, connection).is_err() {
            return;
        }
        if connection == Connection::Close {
            linger(&mut reader);
            return;
        }
    }
}

/// Accept connections on `listener` on a thread of its own, serving each (within `limits`) on a
/// thread of its own with `handler`.
///
/// # Errors
/// If the accept thread cannot be started.
pub fn spawn<H>(listener: UnixListener, limits: Limits, handler: H) -> io::Result<JoinHandle<()>>
where
    H: Fn(&Request) -> Response + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(Slots {
        busy: Mutex::new(0),
        freed: Condvar::new(),
        max: limits.max_connections.max(1),
    });
    // Accept blocking, on a thread of its own: a polling accept would add its polling period to
    // every API call (a snapshot create is a few milliseconds).
    std::thread::Builder::new()
        .name("squib-api-accept".to_owned())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(e) => {
                        // EMFILE and the like: do not spin.
                        tracing::warn!("accepting an API connection: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let Some(slot) = slots.take(limits.slot_wait) else {
                    refuse(stream, &limits);
                    continue;
                };
                let handler = Arc::clone(&handler);
                let spawned = std::thread::Builder::new()
                    .name("squib-api".to_owned())
                    .spawn(move || {
                        serve_connection(stream, &limits, &*handler);
                        drop(slot);
                    });
                if let Err(e) = spawned {
                    tracing::warn!("starting an API connection thread: {e}");
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::path::PathBuf;

    use super::*;

    /// How long a test client waits for any answer before failing (the server's own timeouts in
    /// these tests are far shorter).
    const PATIENCE: Duration = Duration::from_secs(60);

    /// Replies with what it was sent: the ground truth is the request the test wrote.
    fn echo(req: &Request) -> Response {
        Response::ok(
            serde_json::json!({
                "method": req.method,
                "path": req.path,
                "body": String::from_utf8_lossy(&req.body),
            })
            .to_string(),
        )
    }

    struct Server {
        _dir: tempfile::TempDir,
        sock: PathBuf,
    }

    fn start(limits: Limits) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("api.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        spawn(listener, limits, echo).expect("accept thread");
        Server { _dir: dir, sock }
    }

    fn limits(max_connections: usize, request_timeout: Duration) -> Limits {
        Limits {
            max_connections,
            request_timeout,
            write_timeout: PATIENCE,
            slot_wait: PATIENCE,
        }
    }

    fn connect(server: &Server) -> BufReader<UnixStream> {
        let s = UnixStream::connect(&server.sock).expect("connect");
        s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
        s.set_write_timeout(Some(PATIENCE)).expect("write timeout");
        BufReader::new(s)
    }

    fn send(c: &mut BufReader<UnixStream>, bytes: &[u8]) {
        c.get_mut().write_all(bytes).expect("send");
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: serde_json::Value,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }

        fn fault(&self) -> &str {
            self.body["fault_message"]
                .as_str()
                .unwrap_or_else(|| panic!("no fault_message in {self:?}"))
        }
    }

    /// The next reply, its head parsed by httparse and its body framed by its `Content-Length`;
    /// `None` at a clean end of stream.
    fn read_reply(c: &mut BufReader<UnixStream>) -> Option<Reply> {
        let mut head = Vec::new();
        loop {
            let start = head.len();
            let n = c
                .read_until(b'\n', &mut head)
                .unwrap_or_else(|e| panic!("reading a reply (after {head:?}): {e}"));
            if n == 0 {
                assert!(
                    head.is_empty(),
                    "reply cut short: {:?}",
                    String::from_utf8_lossy(&head)
                );
                return None;
            }
            if head[start..] == *b"\r\n" {
                break;
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut parsed = httparse::Response::new(&mut headers);
        assert!(parsed.parse(&head).expect("a valid reply head").is_complete());
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let status = parsed.code.expect("status");
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().expect("Content-Length"));
        let mut body = vec![0u8; length];
        c.read_exact(&mut body).expect("reply body");
        let body = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).expect("a JSON body")
        };
        Some(Reply {
            status,
            headers,
            body,
        })
    }

    fn every_reply(c: &mut BufReader<UnixStream>) -> Vec<Reply> {
        std::iter::from_fn(|| read_reply(c)).collect()
    }

    fn get(c: &mut BufReader<UnixStream>, path: &str) -> Reply {
        send(
            c,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
        );
        read_reply(c).unwrap_or_else(|| panic!("GET {path}: closed without a reply"))
    }

    fn assert_echo(reply: &Reply, method: &str, path: &str, body: &str) {
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body["method"], method, "{reply:?}");
        assert_eq!(reply.body["path"], path, "{reply:?}");
        assert_eq!(reply.body["body"], body, "{reply:?}");
    }

    #[test]
    fn test_should_answer_malformed_framing_with_one_400_and_close() {
        let server = start(limits(8, PATIENCE));
        let long_line = format!(
            "GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n",
            "v".repeat(super::super::http::MAX_LINE)
        );
        let many_headers = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(65));
        let cases: [(&str, &[u8]); 10] = [
            (
                "space before colon",
                b"PUT /a HTTP/1.1\r\nContent-Length : 2\r\n\r\n{}",
            ),
            (
                "two different lengths",
                b"PUT /a HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 2\r\n\r\n{}",
            ),
            (
                "signed length",
                b"PUT /a HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
            ),
            (
                "chunked body",
                b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            ),
            ("request line without version", b"GET /a\r\n\r\n"),
            ("request line with two spaces", b"GET  /a HTTP/1.1\r\n\r\n"),
            ("HTTP/2 request line", b"GET /a HTTP/2.0\r\n\r\n"),
            ("oversize line", long_line.as_bytes()),
            ("too many headers", many_headers.as_bytes()),
            (
                "oversize body",
                b"PUT /a HTTP/1.1\r\nContent-Length: 65537\r\n\r\n{}",
            ),
        ];
        for (what, bytes) in cases {
            let mut c = connect(&server);
            // A valid request follows: it must not be served after the framing error.
            let mut stream = bytes.to_vec();
            stream.extend_from_slice(b"GET /after HTTP/1.1\r\n\r\n");
            send(&mut c, &stream);
            let replies = every_reply(&mut c);
            assert_eq!(replies.len(), 1, "{what}: {replies:?}");
            let reply = &replies[0];
            assert_eq!(reply.status, 400, "{what}: {reply:?}");
            assert!(!reply.fault().is_empty(), "{what}");
            assert_eq!(reply.header("connection"), Some("close"), "{what}");
        }
        // The same harness sees both replies of two valid requests.
        let mut c = connect(&server);
        send(
            &mut c,
            b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /after HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        let replies = every_reply(&mut c);
        assert_eq!(replies.len(), 2, "{replies:?}");
        assert_echo(&replies[0], "PUT", "/a", "{}");
        assert_echo(&replies[1], "GET", "/after", "");
    }

    #[test]
    fn test_should_serve_a_third_client_while_two_others_say_nothing() {
        // Neither the silent nor the stalled client can time out within PATIENCE: the third is
        // served while both still hold their connections.
        let server = start(limits(3, PATIENCE));
        let _silent = connect(&server);
        let mut stalled = connect(&server);
        send(&mut stalled, b"PUT /a HTTP/1.1\r\nContent-Le");
        let mut c = connect(&server);
        send(
            &mut c,
            b"PUT /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\": \"Paused\"}",
        );
        let reply = read_reply(&mut c).expect("a reply");
        assert_echo(&reply, "PUT", "/vm", "{\"state\": \"Paused\"}");
    }

    #[test]
    fn test_should_close_a_silent_client_after_the_request_timeout() {
        // One connection at a time: the second client is served only once the silent one is gone.
        let server = start(limits(1, Duration::from_millis(200)));
        let mut silent = connect(&server);
        let mut c = connect(&server);
        let reply = get(&mut c, "/second");
        assert_echo(&reply, "GET", "/second", "");
        // The silent client was closed without a word.
        let mut rest = Vec::new();
        silent
            .read_to_end(&mut rest)
            .expect("an end of stream, not a read timeout");
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    }

    #[test]
    fn test_should_answer_408_to_a_client_that_stalls_mid_request() {
        let server = start(limits(1, Duration::from_millis(200)));
        let mut stalled = connect(&server);
        send(
            &mut stalled,
            b"PUT /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a\"",
        );
        let replies = every_reply(&mut stalled);
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0].status, 408, "{replies:?}");
        assert!(replies[0].fault().contains("not complete"), "{replies:?}");
        let mut c = connect(&server);
        assert_echo(&get(&mut c, "/next"), "GET", "/next", "");
    }

    #[test]
    fn test_should_cut_off_a_client_that_drips_its_request() {
        // Each byte arrives well within the timeout; the request as a whole does not.
        let server = start(limits(1, Duration::from_millis(300)));
        let mut c = connect(&server);
        let mut dripper = c.get_ref().try_clone().expect("clone");
        let request = format!(
            "PUT /drip HTTP/1.1\r\nX-Pad: {}\r\nContent-Length: 2\r\n\r\n{{}}",
            "x".repeat(2000)
        );
        let drip = std::thread::spawn(move || {
            for b in request.bytes() {
                if dripper.write_all(&[b]).is_err() {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            true
        });
        let replies = every_reply(&mut c);
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0].status, 408, "{replies:?}");
        drop(c);
        // The dripper's 2 050 bytes take at least 20 s; it is refused long before the end.
        assert!(!drip.join().expect("dripper"), "the whole request was written");
    }

    #[test]
    fn test_should_hold_the_connection_bound() {
        let server = start(Limits {
            slot_wait: Duration::from_millis(50),
            ..limits(2, PATIENCE)
        });
        let mut a = connect(&server);
        let mut b = connect(&server);
        assert_echo(&get(&mut a, "/a"), "GET", "/a", "");
        assert_echo(&get(&mut b, "/b"), "GET", "/b", "");
        // Both are served and kept open: a third is refused, with a clear answer.
        let mut c = connect(&server);
        send(&mut c, b"GET /c HTTP/1.1\r\n\r\n");
        let replies = every_reply(&mut c);
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0].status, 503, "{replies:?}");
        assert!(
            replies[0].fault().contains("at most 2 API connections"),
            "{replies:?}"
        );
        assert_eq!(replies[0].header("connection"), Some("close"));
        // The two served connections were not disturbed.
        assert_echo(&get(&mut a, "/a2"), "GET", "/a2", "");
        // Once one closes, a new client is served (retrying while the server notices the close).
        drop(a);
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut d = connect(&server);
            let reply = get(&mut d, "/d");
            if reply.status == 200 {
                assert_echo(&reply, "GET", "/d", "");
                break;
            }
            assert_eq!(reply.status, 503, "{reply:?}");
            assert!(Instant::now() < deadline, "no connection freed after one closed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_echo(&get(&mut b, "/b2"), "GET", "/b2", "");
    }

    #[test]
    fn test_should_drop_a_client_that_never_reads_its_replies() {
        let server = start(Limits {
            write_timeout: Duration::from_millis(200),
            ..limits(1, PATIENCE)
        });
        let deaf = connect(&server);
        let mut writer = deaf.get_ref().try_clone().expect("clone");
        // Requests pipelined without end; the replies fill the socket until the server's write
        // times out and it closes the connection, which ends these writes.
        let flood = std::thread::spawn(move || {
            let batch = b"GET / HTTP/1.1\r\n\r\n".repeat(1000);
            while writer.write_all(&batch).is_ok() {}
        });
        let mut c = connect(&server);
        assert_echo(&get(&mut c, "/next"), "GET", "/next", "");
        flood.join().expect("flood");
        drop(deaf);
    }

    #[test]
    fn test_should_send_100_continue_before_the_body_arrives() {
        let server = start(limits(1, PATIENCE));
        let mut c = connect(&server);
        send(
            &mut c,
            b"PUT /snapshot/create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
        );
        let mut interim = String::new();
        c.read_line(&mut interim).expect("interim reply");
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n");
        interim.clear();
        c.read_line(&mut interim).expect("interim reply end");
        assert_eq!(interim, "\r\n");
        send(&mut c, b"{}");
        assert_echo(
            &read_reply(&mut c).expect("a reply"),
            "PUT",
            "/snapshot/create",
            "{}",
        );
    }
}
