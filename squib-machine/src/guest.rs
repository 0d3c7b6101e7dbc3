//! What squib's test guest prints, and what a correct run of it looks like.
//!
//! Every 100 ms the guest prints `COUNTER <n>` followed, per online CPU `c`,
//! by `ck<c>=<hex> ok<c>=<dec> bad<c>=<dec> back<c>=<dec>` (see
//! `guest/kernel.S`). A run is consistent when the counter goes up by exactly
//! one per line (across a snapshot and restore too: the restored guest's
//! output continues the stream), no CPU's re-check of its checksum ever
//! failed, its TSC never went backwards, and its count of good re-checks
//! never fell.

/// One CPU's part of a `COUNTER` line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuReport {
    /// The checksum of the CPU's work region at its last successful re-check.
    pub ck: u64,
    /// Re-checks that agreed.
    pub ok: u64,
    /// Re-checks that disagreed.
    pub bad: u64,
    /// TSC reads that went backwards.
    pub back: u64,
}

/// One `COUNTER` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterLine {
    /// The counter.
    pub counter: u64,
    /// Per CPU, by index.
    pub cpus: Vec<CpuReport>,
}

fn parse_line(rest: &str) -> Option<CounterLine> {
    let mut words = rest.split(' ');
    let counter = words.next()?.parse().ok()?;
    let mut cpus: Vec<CpuReport> = Vec::new();
    for w in words {
        let (key, value) = w.split_once('=')?;
        let split = key.len().checked_sub(1)?;
        let (name, cpu) = (key.get(..split)?, key.get(split..)?);
        let cpu: usize = cpu.parse().ok()?;
        if cpu >= 64 {
            return None;
        }
        if cpus.len() <= cpu {
            cpus.resize(cpu + 1, CpuReport::default());
        }
        let c = &mut cpus[cpu];
        match name {
            "ck" => c.ck = u64::from_str_radix(value, 16).ok()?,
            "ok" => c.ok = value.parse().ok()?,
            "bad" => c.bad = value.parse().ok()?,
            "back" => c.back = value.parse().ok()?,
            _ => return None,
        }
    }
    Some(CounterLine { counter, cpus })
}

/// The `COUNTER` lines of a console stream; a last line without its newline
/// (still being printed) is left out.
///
/// ```
/// use squib_machine::guest::parse;
///
/// let text = "squib guest: e820=2\nCOUNTER 1 ck0=00000000000000ff ok0=3 bad0=0 back0=0\nCOUNTER 2 ck0=0";
/// let lines = parse(text);
/// assert_eq!(lines.len(), 1);
/// assert_eq!(lines[0].counter, 1);
/// assert_eq!(lines[0].cpus[0].ck, 0xff);
/// ```
#[must_use]
pub fn parse(text: &str) -> Vec<CounterLine> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("COUNTER "))
        .filter_map(parse_line)
        .collect()
}

/// Check that `lines` are a consistent run on `vcpus` CPUs in which every CPU
/// did work; the error says which line broke which rule.
///
/// # Errors
/// A message naming the rule and the offending line(s).
///
/// ```
/// use squib_machine::guest::{check, parse};
///
/// let good = "COUNTER 1 ck0=1 ok0=1 bad0=0 back0=0\nCOUNTER 2 ck0=2 ok0=5 bad0=0 back0=0\n";
/// assert!(check(&parse(good), 1).is_ok());
/// let skipped = "COUNTER 1 ck0=1 ok0=1 bad0=0 back0=0\nCOUNTER 3 ck0=2 ok0=5 bad0=0 back0=0\n";
/// assert!(check(&parse(skipped), 1).unwrap_err().contains("skipped"));
/// ```
pub fn check(lines: &[CounterLine], vcpus: usize) -> Result<(), String> {
    let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
        return Err("no COUNTER line".to_owned());
    };
    for w in lines.windows(2) {
        if w[1].counter != w[0].counter + 1 {
            return Err(format!("counter skipped or repeated: {w:?}"));
        }
        for (a, b) in w[0].cpus.iter().zip(&w[1].cpus) {
            if b.ok < a.ok {
                return Err(format!("re-check count went back: {w:?}"));
            }
        }
    }
    for l in lines {
        if l.cpus.len() != vcpus {
            return Err(format!("expected {vcpus} CPUs reporting: {l:?}"));
        }
        if l.cpus.iter().any(|c| c.bad != 0) {
            return Err(format!("checksum re-check failed: {l:?}"));
        }
        if l.cpus.iter().any(|c| c.back != 0) {
            return Err(format!("TSC went backwards: {l:?}"));
        }
    }
    if lines.len() > 1 {
        for (cpu, (a, b)) in first.cpus.iter().zip(&last.cpus).enumerate() {
            if b.ok <= a.ok {
                return Err(format!("CPU {cpu} did no work between {first:?} and {last:?}"));
            }
        }
    }
    Ok(())
}
