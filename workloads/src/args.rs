//! The functions' argument parsing: `--flag value` pairs only, no parser
//! crate, so a function's start-up stays small.

/// `--flag value` pairs, in order.
pub fn pairs<'a>(rest: &'a [String], usage: &str) -> Result<Vec<(&'a str, &'a str)>, String> {
    rest.chunks(2)
        .map(|c| match c {
            [flag, value] => Ok((flag.as_str(), value.as_str())),
            _ => Err(format!("{} needs a value\n{usage}", c[0])),
        })
        .collect()
}

pub fn number<T: std::str::FromStr>(flag: &str, value: &str, usage: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} needs a number, not {value:?}\n{usage}"))
}

pub fn unknown(flag: &str, usage: &str) -> String {
    format!("unknown option {flag}\n{usage}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_and_numbers() {
        let args: Vec<String> = ["--a", "1", "--b"].iter().map(|s| s.to_string()).collect();
        assert!(pairs(&args, "u").unwrap_err().contains("--b needs a value"));
        assert_eq!(pairs(&args[..2], "u").unwrap(), [("--a", "1")]);
        assert_eq!(number::<u8>("--a", "7", "u"), Ok(7));
        assert!(number::<u8>("--a", "x", "u").is_err());
    }
}
