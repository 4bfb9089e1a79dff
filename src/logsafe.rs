//! Text from outside the process made safe to log: KV values and keys, DNS names,
//! container names and declarations, whatever a server or client sent. Control
//! characters (and the Unicode line and paragraph separators) are escaped, so a value
//! cannot end a log line and forge the next one, and the text is cut to a bounded
//! length, so a megabyte value cannot make a megabyte line. Both log formats get the
//! same text.

use std::fmt;

/// How many characters of one outside value a message shows.
pub const MAX_CHARS: usize = 200;

/// `text` escaped and cut to `max` characters (with how much was left out).
pub fn bounded(text: &str, max: usize) -> String {
    Outside::new(text, max).to_string()
}

/// Displays outside text escaped and cut; see the module documentation.
#[derive(Clone, Copy)]
pub struct Outside<'a> {
    text: &'a str,
    max: usize,
}

impl<'a> Outside<'a> {
    pub fn new(text: &'a str, max: usize) -> Self {
        Outside { text, max }
    }
}

/// Outside text shown with the usual bound ([`MAX_CHARS`]).
pub fn outside(text: &str) -> Outside<'_> {
    Outside::new(text, MAX_CHARS)
}

impl fmt::Display for Outside<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, (i, c)) in self.text.char_indices().enumerate() {
            if shown == self.max {
                let rest = self.text.len() - i;
                return write!(f, "…(+{rest} bytes)");
            }
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Outside<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_text_is_cut() {
        assert_eq!(
            bounded("a\nERROR forged\r\u{1b}[31m", 100),
            "a\\nERROR forged\\r\\u{1b}[31m"
        );
        assert_eq!(bounded("line\u{2028}sep", 100), "line\\u{2028}sep");
        assert_eq!(bounded("ünïcode stays", 100), "ünïcode stays");
        let long = "x".repeat(1 << 20);
        let cut = bounded(&long, 200);
        assert_eq!(
            cut,
            format!("{}…(+{} bytes)", "x".repeat(200), (1 << 20) - 200)
        );
        assert_eq!(bounded("exactly", 7), "exactly");
    }
}
