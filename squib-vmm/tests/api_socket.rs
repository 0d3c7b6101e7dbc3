//! The API socket's path appears only once it accepts: a client that waits for the file and
//! then connects (as Firecracker's SDKs and curl scripts do) is never refused.
#![cfg(target_os = "linux")]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn test_should_accept_a_connection_as_soon_as_the_socket_path_exists() {
    let dir = tempfile::tempdir().expect("temp dir");
    for i in 0..10 {
        let sock = dir.path().join(format!("api{i}.sock"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_squib"))
            .args(["run", "--backend", "kvm", "--api-sock"])
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn squib");
        let deadline = Instant::now() + Duration::from_secs(60);
        // Poll as tightly as a client can: the first moment the path exists, connect.
        while !sock.exists() {
            if let Some(status) = child.try_wait().expect("poll squib") {
                panic!("squib ended before serving {}: {status}", sock.display());
            }
            assert!(Instant::now() < deadline, "no API socket {}", sock.display());
            std::hint::spin_loop();
        }
        let connected = UnixStream::connect(&sock);
        let _ = child.kill();
        let _ = child.wait();
        let mut s = connected.unwrap_or_else(|e| panic!("run {i}: the socket existed but refused: {e}"));
        // It is squib's API answering, not some other socket: the connection outlived the
        // process only as a closed stream, so either a reply or end of stream, never a refusal.
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            !dir.path().read_dir().unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("squib-bind")),
            "a temporary bind name was left behind"
        );
    }
}
