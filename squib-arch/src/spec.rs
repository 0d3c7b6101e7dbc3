//! The two small languages every squib command line speaks: byte sizes (`256M`, `1G`, `2MiB`)
//! and named specifications (`NAME[:k=v,...]`, as in `--workload hotspot:s=1.5,seed=7`).
//!
//! Why here: the soft backend, the KVM guests, the HVF runner and the command all take sizes and
//! workload specs; with one parser each they cannot disagree on what `16k` or `a=1,a=2` means.
//! No I/O, no allocation beyond the parsed list.

/// What a size or a named spec can be wrong about. Each variant names the text it refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A size is not a number with an optional unit.
    #[error("size {text:?}: {reason}")]
    BadSize {
        /// The text given.
        text: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A parameter of a named spec is not `key=value`, has an empty key, or repeats a key.
    #[error("{spec:?}: parameter {param:?}: {reason}")]
    BadParameter {
        /// The whole spec.
        spec: String,
        /// The parameter.
        param: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Parse a byte size: decimal digits with an optional binary unit `K`, `M`, `G` or `T` (either
/// case), optionally followed by `B` or `iB` (either case). Zero is a size; callers that need more say so.
///
/// ```
/// use squib_arch::spec::parse_size;
/// assert_eq!(parse_size("256M"), Ok(256 << 20));
/// assert_eq!(parse_size("2MiB"), Ok(2 << 20));
/// assert_eq!(parse_size("16k"), Ok(16 << 10));
/// assert_eq!(parse_size("1T"), Ok(1 << 40));
/// assert!(parse_size("+4").is_err());
/// assert!(parse_size("12Q").unwrap_err().to_string().contains("12Q"));
/// ```
///
/// # Errors
/// [`SpecError::BadSize`] naming the text: no digits, an unknown unit, or more than `u64::MAX`.
pub fn parse_size(text: &str) -> Result<u64, SpecError> {
    let bad = |reason| SpecError::BadSize {
        text: text.to_owned(),
        reason,
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    if split == 0 {
        return Err(bad("not a number (digits, then an optional K, M, G or T)"));
    }
    let n: u64 = text[..split].parse().map_err(|_| bad("too large"))?;
    let unit = text[split..].to_ascii_uppercase();
    let prefix = match unit.strip_suffix("IB") {
        Some("") => return Err(bad("unknown unit (use K, M, G or T)")),
        Some(p) => p,
        None => unit.strip_suffix('B').unwrap_or(&unit),
    };
    let shift = match prefix {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad("unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| bad("too large"))
}

/// A parsed `NAME[:k=v,...]`: the name and the parameters in the order given, each key once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedSpec<'a> {
    /// The text before the first `:` (the whole text without one).
    pub name: &'a str,
    /// The `key=value` pairs after it.
    pub params: Vec<(&'a str, &'a str)>,
}

impl<'a> NamedSpec<'a> {
    /// Split `text` into its name and parameters. Empty parameters (`a=1,,b=2`, a trailing comma)
    /// are skipped; values are taken as written (a value may contain `=`).
    ///
    /// ```
    /// use squib_arch::spec::NamedSpec;
    /// let s = NamedSpec::parse("hotspot:s=1.5,seed=7").unwrap();
    /// assert_eq!(s.name, "hotspot");
    /// assert_eq!(s.params, vec![("s", "1.5"), ("seed", "7")]);
    /// assert!(NamedSpec::parse("seq:size").is_err());
    /// assert!(NamedSpec::parse("seq:seed=1,seed=2").is_err());
    /// ```
    ///
    /// # Errors
    /// [`SpecError::BadParameter`] for a parameter without `=`, with an empty key, or whose key
    /// came before.
    pub fn parse(text: &'a str) -> Result<Self, SpecError> {
        let (name, rest) = text.split_once(':').unwrap_or((text, ""));
        let bad = |param: &str, reason| SpecError::BadParameter {
            spec: text.to_owned(),
            param: param.to_owned(),
            reason,
        };
        let mut params: Vec<(&str, &str)> = Vec::new();
        for param in rest.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = param
                .split_once('=')
                .ok_or_else(|| bad(param, "expected key=value"))?;
            if k.is_empty() {
                return Err(bad(param, "empty key"));
            }
            if params.iter().any(|(seen, _)| *seen == k) {
                return Err(bad(param, "key given twice"));
            }
            params.push((k, v));
        }
        Ok(Self { name, params })
    }

    /// The value of `key`, if given.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.params.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_refuse_sizes_that_are_not_plain_digits_and_a_unit() {
        for bad in [
            "", "M", "+4", "-4", " 4", "4 M", "4MB8", "0x10", "1.5G", "4Mi", "4KiBB", "4iB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("3gb"), Ok(3 << 30));
        assert_eq!(parse_size("4B"), Ok(4));
        assert_eq!(parse_size("3GiB"), Ok(3 << 30));
        assert_eq!(
            parse_size("3X"),
            Err(SpecError::BadSize {
                text: "3X".into(),
                reason: "unknown unit (use K, M, G or T)"
            })
        );
    }

    #[test]
    fn test_should_refuse_sizes_past_u64() {
        assert!(parse_size("16777216T").is_err()); // 2^64
        assert_eq!(parse_size("16777215T"), Ok(16_777_215 << 40));
        assert!(parse_size("99999999999999999999").is_err());
    }

    #[test]
    fn test_should_keep_parameter_order_and_values_with_equals() {
        let s = NamedSpec::parse("x:b=1,a=k=v,,").unwrap();
        assert_eq!(s.params, vec![("b", "1"), ("a", "k=v")]);
        assert_eq!(s.get("a"), Some("k=v"));
        assert_eq!(s.get("c"), None);
        assert_eq!(NamedSpec::parse("idle").unwrap().params, vec![]);
        assert!(
            NamedSpec::parse("x:=1")
                .unwrap_err()
                .to_string()
                .contains("empty key")
        );
    }
}
