//! Fuzz the API's request reader (`squib_vmm::api::http`), the code `squib run --api-sock`
//! serves with: the input's first byte picks the read buffer's size (1 to 64 bytes, so lines and
//! bodies straddle refills), the rest is a stream of requests, read until it ends or is refused.
//!
//! Each outcome must be a request or a refusal (`Bad`, a 400) or a clean end; never a panic, never
//! an I/O error or a timeout from memory. Each request read must stay within the bounds, name a
//! path, have been sent `100 Continue` only if it has a body, and read back the same when written
//! plainly (the reader keeps no more and no less than the request said).
#![no_main]

use std::io::BufReader;

use libfuzzer_sys::fuzz_target;
use squib_vmm::api::http::{HttpError, MAX_BODY, MAX_LINE, Request, read_request, read_request_answering};

fuzz_target!(|data: &[u8]| {
    let Some((&size, stream)) = data.split_first() else {
        return;
    };
    let mut r = BufReader::with_capacity(usize::from(size % 64) + 1, stream);
    for _ in 0..16 {
        let mut interim = Vec::new();
        match read_request_answering(&mut r, &mut interim) {
            Ok(req) => check(&req, &interim),
            Err(HttpError::Closed | HttpError::Bad(_)) => return,
            Err(e) => panic!("reading from memory gave {e:?}"),
        }
    }
});

fn check(req: &Request, interim: &[u8]) {
    assert!(req.body.len() <= MAX_BODY, "body of {} bytes", req.body.len());
    assert!(
        req.path.starts_with('/') && req.path.len() <= MAX_LINE,
        "path {:?}",
        req.path
    );
    assert!(
        interim.is_empty() || (interim == b"HTTP/1.1 100 Continue\r\n\r\n" && !req.body.is_empty()),
        "interim reply {interim:?} for a body of {} bytes",
        req.body.len()
    );
    let mut plain = format!(
        "{} {} HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        req.method,
        req.path,
        req.body.len()
    )
    .into_bytes();
    plain.extend_from_slice(&req.body);
    let back = read_request(&mut &plain[..]).expect("a request written plainly reads back");
    assert_eq!(
        (&back.method, &back.path, &back.body),
        (&req.method, &req.path, &req.body)
    );
}
