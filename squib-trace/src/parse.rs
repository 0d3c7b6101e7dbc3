//! Streaming parsers for the two trace formats.
//!
//! Traces run to gigabytes, so parsing reads one line at a time into a buffer that is reused for
//! the whole file, decodes numbers straight from the bytes, and never allocates per line. Every
//! malformed line is an error naming its number and its text: a replay that silently skipped
//! lines would report a policy comparison over a different trace than the user gave.

use std::collections::HashMap;
use std::io::BufRead;

use super::TraceError;

/// The size of a 2 MiB block of the traced process's address space (lackey packing).
const PACK_BLOCK: u64 = 2 << 20;
/// Where the last 2 MiB block of the 64-bit address space starts: lackey accesses must end at or
/// below it (every address arithmetic below then stays in range).
const TOP_BLOCK: u64 = u64::MAX - (PACK_BLOCK - 1);

/// One thing a trace says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A guest write of `len` bytes at `gpa`, at time `t_ns`.
    Write {
        /// Trace time, ns.
        t_ns: u64,
        /// First byte written.
        gpa: u64,
        /// Bytes written (at least 1).
        len: u64,
    },
    /// An explicit checkpoint at `t_ns`.
    Checkpoint {
        /// Trace time, ns.
        t_ns: u64,
    },
}

/// Which text format a trace is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceFormat {
    /// squib's own: `<t_ns> <gpa> <len>` and `<t_ns> checkpoint` lines.
    Squib,
    /// `valgrind --tool=lackey --trace-mem=yes` output.
    Lackey,
}

impl std::str::FromStr for TraceFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "squib" => Ok(Self::Squib),
            "lackey" => Ok(Self::Lackey),
            _ => Err(format!("unknown trace format {s:?}: expected squib or lackey")),
        }
    }
}

/// Reads lines into one reused buffer, counting them.
struct Lines<R> {
    input: R,
    buf: Vec<u8>,
    line: u64,
}

impl<R: BufRead> Lines<R> {
    /// The next line without its terminator and surrounding blanks, or `None` at the end.
    fn next(&mut self) -> Result<Option<&[u8]>, TraceError> {
        self.buf.clear();
        let n = self
            .input
            .read_until(b'\n', &mut self.buf)
            .map_err(|source| TraceError::Read {
                line: self.line + 1,
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        Ok(Some(self.buf.trim_ascii()))
    }
}

fn malformed(line: u64, text: &[u8], reason: &'static str) -> TraceError {
    const MAX: usize = 160;
    let mut t = String::from_utf8_lossy(&text[..text.len().min(MAX)]).into_owned();
    if text.len() > MAX {
        t.push('…');
    }
    TraceError::Malformed {
        line,
        text: t,
        reason,
    }
}

/// A decimal `u64`.
fn dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// A hexadecimal `u64` without prefix.
fn hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}

/// `0x`-prefixed hex or decimal.
fn number(s: &[u8]) -> Option<u64> {
    match s {
        [b'0', b'x' | b'X', rest @ ..] => hex(rest),
        _ => dec(s),
    }
}

/// Split off the next whitespace-separated field.
fn field(s: &[u8]) -> (&[u8], &[u8]) {
    let s = s.trim_ascii_start();
    let end = s.iter().position(u8::is_ascii_whitespace).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// A stream of [`Event`]s from a trace.
pub struct EventReader<R> {
    lines: Lines<R>,
    format: TraceFormat,
    last_t: u64,
    // Lackey state.
    ns_per_instr: f64,
    instrs: u64,
    blocks: HashMap<u64, u64>,
    last_block: Option<(u64, u64)>,
    /// The second half of a lackey write that crossed a process block boundary.
    pending: Option<Event>,
}

impl<R: BufRead> EventReader<R> {
    /// Read `format` from `input`. `ns_per_instr` is the time each lackey `I` line advances.
    pub fn new(input: R, format: TraceFormat, ns_per_instr: f64) -> Self {
        Self {
            lines: Lines {
                input,
                buf: Vec::with_capacity(256),
                line: 0,
            },
            format,
            last_t: 0,
            ns_per_instr,
            instrs: 0,
            blocks: HashMap::new(),
            last_block: None,
            pending: None,
        }
    }

    /// The number of the line last read (1-based; 0 before the first).
    pub const fn line(&self) -> u64 {
        self.lines.line
    }

    /// Lackey: how many distinct 2 MiB process blocks have been packed so far.
    pub fn packed_blocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// The next event, or `None` at the end of the trace.
    ///
    /// # Errors
    /// [`TraceError::Malformed`] with the line number and text; [`TraceError::TimeBackwards`];
    /// [`TraceError::TopOfAddressSpace`] for a lackey access in the last 2 MiB of the address
    /// space; [`TraceError::Read`] when the input fails.
    pub fn next_event(&mut self) -> Result<Option<Event>, TraceError> {
        if let Some(e) = self.pending.take() {
            return Ok(Some(e));
        }
        match self.format {
            TraceFormat::Squib => self.next_squib(),
            TraceFormat::Lackey => self.next_lackey(),
        }
    }

    fn next_squib(&mut self) -> Result<Option<Event>, TraceError> {
        loop {
            let line_no = self.lines.line + 1;
            let Some(text) = self.lines.next()? else {
                return Ok(None);
            };
            if text.is_empty() || text[0] == b'#' {
                continue;
            }
            let (t, rest) = field(text);
            let t_ns =
                dec(t).ok_or_else(|| malformed(line_no, text, "time is not a decimal number of ns"))?;
            if t_ns < self.last_t {
                return Err(TraceError::TimeBackwards {
                    line: line_no,
                    t_ns,
                    previous: self.last_t,
                });
            }
            self.last_t = t_ns;
            let (a, rest) = field(rest);
            if a == b"checkpoint" {
                if !rest.trim_ascii().is_empty() {
                    return Err(malformed(line_no, text, "unexpected text after `checkpoint`"));
                }
                return Ok(Some(Event::Checkpoint { t_ns }));
            }
            if a.is_empty() {
                return Err(malformed(
                    line_no,
                    text,
                    "expected `<t_ns> <gpa> <len>` or `<t_ns> checkpoint`",
                ));
            }
            let gpa = number(a)
                .ok_or_else(|| malformed(line_no, text, "address is not a 0x-hex or decimal number"))?;
            let (l, rest) = field(rest);
            if l.is_empty() {
                return Err(malformed(line_no, text, "missing length"));
            }
            let len = number(l).ok_or_else(|| malformed(line_no, text, "length is not a number"))?;
            if !rest.trim_ascii().is_empty() {
                return Err(malformed(line_no, text, "unexpected text after the length"));
            }
            if len == 0 {
                return Err(malformed(line_no, text, "a write of zero bytes"));
            }
            if gpa.checked_add(len).is_none() {
                return Err(malformed(
                    line_no,
                    text,
                    "the write runs past the end of the address space",
                ));
            }
            return Ok(Some(Event::Write { t_ns, gpa, len }));
        }
    }

    fn next_lackey(&mut self) -> Result<Option<Event>, TraceError> {
        loop {
            let line_no = self.lines.line + 1;
            let Some(text) = self.lines.next()? else {
                return Ok(None);
            };
            if text.is_empty() || text.starts_with(b"==") || text.starts_with(b"--") {
                // Blank lines and valgrind's own messages.
                continue;
            }
            let kind = text[0];
            let body = text[1..].trim_ascii_start();
            let Some(comma) = body.iter().position(|&c| c == b',') else {
                return Err(malformed(line_no, text, "expected `KIND ADDR,SIZE`"));
            };
            let addr =
                hex(&body[..comma]).ok_or_else(|| malformed(line_no, text, "address is not hexadecimal"))?;
            let size = dec(body[comma + 1..].trim_ascii())
                .ok_or_else(|| malformed(line_no, text, "size is not a decimal number"))?;
            match kind {
                b'I' => {
                    self.instrs += 1;
                    continue;
                }
                b'L' => continue,
                b'S' | b'M' => {}
                _ => {
                    return Err(malformed(
                        line_no,
                        text,
                        "unknown record kind (expected I, L, S or M)",
                    ));
                }
            }
            if size == 0 {
                continue;
            }
            if size > PACK_BLOCK {
                // Lackey records one instruction's access (a few KiB at most), so a write spans at
                // most two process blocks, which is all the split below handles.
                return Err(malformed(
                    line_no,
                    text,
                    "an access larger than 2 MiB (lackey records one instruction's access)",
                ));
            }
            // The block an access ends in must have an end address: `(addr | (PACK_BLOCK - 1)) + 1`
            // overflows in the last block of the address space (and `addr + size` past its end).
            if addr.checked_add(size).is_none_or(|end| end > TOP_BLOCK) {
                return Err(TraceError::TopOfAddressSpace {
                    line: line_no,
                    addr,
                    size,
                });
            }
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            // A count of instructions fits f64 exactly below 2^53; the product is a time in ns,
            // non-negative and far below u64::MAX for any trace that can exist.
            let t_ns = (self.instrs as f64 * self.ns_per_instr) as u64;
            let first = self.pack(addr);
            let block_end = (addr | (PACK_BLOCK - 1)) + 1;
            if addr + size > block_end {
                // Crosses into the next process block, which may be packed anywhere.
                let second = self.pack(block_end);
                self.pending = Some(Event::Write {
                    t_ns,
                    gpa: second,
                    len: addr + size - block_end,
                });
                return Ok(Some(Event::Write {
                    t_ns,
                    gpa: first,
                    len: block_end - addr,
                }));
            }
            return Ok(Some(Event::Write {
                t_ns,
                gpa: first,
                len: size,
            }));
        }
    }

    /// The guest address of process address `addr`: its 2 MiB block packed in first-touch order.
    fn pack(&mut self, addr: u64) -> u64 {
        let block = addr / PACK_BLOCK;
        let guest = match self.last_block {
            Some((b, g)) if b == block => g,
            _ => {
                let next = self.blocks.len() as u64;
                let g = *self.blocks.entry(block).or_insert(next);
                self.last_block = Some((block, g));
                g
            }
        };
        guest * PACK_BLOCK + (addr % PACK_BLOCK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(text: &str, format: TraceFormat) -> Result<Vec<Event>, TraceError> {
        let mut r = EventReader::new(text.as_bytes(), format, 0.5);
        let mut out = Vec::new();
        while let Some(e) = r.next_event()? {
            out.push(e);
        }
        Ok(out)
    }

    #[test]
    fn test_should_parse_squib_lines_comments_and_checkpoints() {
        let e = events(
            "# hello\n\n10 0x4000 8\n  20 16384 4096 \r\n20 checkpoint\n",
            TraceFormat::Squib,
        )
        .unwrap();
        assert_eq!(
            e,
            vec![
                Event::Write {
                    t_ns: 10,
                    gpa: 0x4000,
                    len: 8
                },
                Event::Write {
                    t_ns: 20,
                    gpa: 16384,
                    len: 4096
                },
                Event::Checkpoint { t_ns: 20 },
            ]
        );
    }

    #[test]
    fn test_should_name_the_line_and_text_of_a_malformed_line() {
        for (text, line) in [
            ("1 0x10 8\n2 0xZZ 8\n", 2u64),
            ("1 0x10\n", 1),
            ("x 0x10 8\n", 1),
            ("1 0x10 8 9\n", 1),
            ("1 0x10 0\n", 1),
            ("1 0xffffffffffffffff 2\n", 1),
            ("1 checkpoint now\n", 1),
        ] {
            match events(text, TraceFormat::Squib) {
                Err(TraceError::Malformed { line: l, text: t, .. }) => {
                    assert_eq!(l, line, "{text:?}");
                    assert_eq!(
                        t,
                        text.lines().nth(usize::try_from(line - 1).unwrap()).unwrap(),
                        "{text:?}"
                    );
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn test_should_refuse_time_going_backwards() {
        assert!(matches!(
            events("5 0 1\n4 0 1\n", TraceFormat::Squib),
            Err(TraceError::TimeBackwards {
                line: 2,
                t_ns: 4,
                previous: 5
            })
        ));
    }

    #[test]
    fn test_should_pack_lackey_blocks_in_first_touch_order() {
        let text = "==1== Lackey\nI  04000000,3\n S 7ff000010,8\n L 7ff000010,8\nI  04000003,4\n M 04000100,4\n S 7ff000020,8\n";
        let e = events(text, TraceFormat::Lackey).unwrap();
        assert_eq!(
            e,
            vec![
                Event::Write {
                    t_ns: 0,
                    gpa: 0x10,
                    len: 8
                },
                Event::Write {
                    t_ns: 1,
                    gpa: PACK_BLOCK + 0x100,
                    len: 4
                },
                Event::Write {
                    t_ns: 1,
                    gpa: 0x20,
                    len: 8
                },
            ]
        );
    }

    #[test]
    fn test_should_split_a_lackey_write_across_process_blocks() {
        let text = " S 1ffffc,8\n S 600000,1\n";
        let e = events(text, TraceFormat::Lackey).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[0],
            Event::Write {
                t_ns: 0,
                gpa: PACK_BLOCK - 4,
                len: 4
            }
        );
        assert_eq!(
            e[1],
            Event::Write {
                t_ns: 0,
                gpa: PACK_BLOCK,
                len: 4
            }
        );
        assert_eq!(
            e[2],
            Event::Write {
                t_ns: 0,
                gpa: 2 * PACK_BLOCK,
                len: 1
            }
        );
    }

    #[test]
    fn test_should_refuse_a_lackey_access_in_the_top_2_mib_naming_the_line_and_the_address() {
        for (addr, size) in [
            (0xffff_ffff_ffff_fff0_u64, 8u64),
            (0xffff_ffff_ffe0_0000, 1),
            (0xffff_ffff_ffdf_fffc, 8),
            (0xffff_ffff_ffff_fff8, 8),
        ] {
            let text = format!("I  04000000,3\n S {addr:x},{size}\n");
            match events(&text, TraceFormat::Lackey) {
                Err(
                    e @ TraceError::TopOfAddressSpace {
                        line: 2,
                        addr: a,
                        size: s,
                    },
                ) => {
                    assert_eq!((a, s), (addr, size));
                    let msg = e.to_string();
                    assert!(
                        msg.contains("line 2") && msg.contains(&format!("{addr:#x}")),
                        "{msg}"
                    );
                }
                other => panic!("{addr:#x},{size}: {other:?}"),
            }
        }
        // The block just below the top one still packs, split where it crosses.
        let e = events(" S ffffffffffbffffc,8\n", TraceFormat::Lackey).unwrap();
        assert_eq!(
            e,
            vec![
                Event::Write {
                    t_ns: 0,
                    gpa: PACK_BLOCK - 4,
                    len: 4
                },
                Event::Write {
                    t_ns: 0,
                    gpa: PACK_BLOCK,
                    len: 4
                },
            ]
        );
    }

    #[test]
    fn test_should_refuse_a_lackey_access_larger_than_a_block() {
        assert!(matches!(
            events(" S 1000,2097153\n", TraceFormat::Lackey),
            Err(TraceError::Malformed { line: 1, .. })
        ));
        assert_eq!(events(" S 1000,2097152\n", TraceFormat::Lackey).unwrap().len(), 2);
    }

    #[test]
    fn test_should_refuse_malformed_lackey_lines() {
        for text in ["X 10,4\n", " S 10\n", " S zz,4\n", " S 10,q\n"] {
            assert!(
                matches!(
                    events(text, TraceFormat::Lackey),
                    Err(TraceError::Malformed { line: 1, .. })
                ),
                "{text:?}"
            );
        }
    }
}
