//! Printing an error together with its causes.
//!
//! Why this exists: squib's error types say each cause once. A variant that carries a cause
//! exposes it through `source()` and leaves it out of its own message, so a reporter that walks
//! the chain (anyhow's `{:#}`, the `squib` binary's error line) prints every cause exactly once;
//! a message that also interpolated its source printed it twice
//! (`state: open failed: No such file or directory: No such file or directory`). The price is that
//! an error's `Display` alone no longer carries its causes, so code that turns an error into text
//! (an API reply, a log field, a message inside another error) uses [`ErrorChain`].

use std::error::Error;
use std::fmt;

/// Displays an error and each of its causes, joined by `": "`, as anyhow's `{:#}` does.
///
/// ```
/// use squib_snapshot::report::ErrorChain;
/// #[derive(Debug, thiserror::Error)]
/// #[error("reading the state file")]
/// struct Outer(#[source] std::io::Error);
/// let e = Outer(std::io::Error::other("disk on fire"));
/// assert_eq!(ErrorChain(&e).to_string(), "reading the state file: disk on fire");
/// ```
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// [`ErrorChain`] as a `String`.
#[must_use]
pub fn error_chain(e: &(dyn Error + 'static)) -> String {
    ErrorChain(e).to_string()
}
