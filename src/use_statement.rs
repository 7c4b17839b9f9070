//! `USE` statements, recognised fail-closed. On a shared upstream connection a `USE` that slips
//! through as an ordinary query switches the keyspace of every client pinned there, so anything
//! whose first token is `USE` is either parsed exactly or refused: a spelling this parser does
//! not understand (`USE ks -- note`, a keyspace followed by more words) must never reach
//! Keyspaces as a plain QUERY.
//!
//! Detection is deliberately looser than the grammar (any Unicode white space or control
//! character and every comment style count as separators), parsing deliberately strict
//! (Cassandra's lexer: `' ' \t \n \r`, `--`/`//` line comments, `/* */` block comments,
//! identifiers `[A-Za-z][A-Za-z0-9_]*`, quoted names with `""` escapes).

use crate::cql_lexer::{comment_end, skip_trivia, Lexer, CASSANDRA, OTHER_LEXERS};

/// What a statement's text says about `USE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UseStatement {
    /// The first token is not `USE`.
    NotUse,
    /// `USE keyspace` with an optional `;`: quoted names keep their case, others are
    /// lowercased, as CQL resolves identifiers.
    Use(String),
    /// Starts with `USE` but is not exactly `USE name [;]`: refuse it.
    Unparsable,
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The end of the identifier-like word starting at `i` (`i` when there is none).
fn word_end(s: &str, i: usize) -> usize {
    i + s.as_bytes()[i..]
        .iter()
        .take_while(|b| is_word_byte(**b))
        .count()
}

/// A keyspace name at `i`: `(name, end)`, or `None` if there is no well-formed one.
fn keyspace_at(s: &str, i: usize) -> Option<(String, usize)> {
    let b = s.as_bytes();
    if b.get(i) == Some(&b'"') {
        let mut name = String::new();
        let mut j = i + 1;
        loop {
            let close = s[j..].find('"')? + j;
            name.push_str(&s[j..close]);
            if b.get(close + 1) == Some(&b'"') {
                name.push('"');
                j = close + 2;
            } else {
                return (!name.is_empty()).then_some((name, close + 1));
            }
        }
    }
    let end = word_end(s, i);
    let word = &s[i..end];
    let starts_with_letter = word.as_bytes().first().is_some_and(u8::is_ascii_alphabetic);
    starts_with_letter.then(|| (word.to_ascii_lowercase(), end))
}

/// Only the four separators of Cassandra's grammar, and comments, between the exact tokens.
fn strict_trivia(s: &str, i: usize) -> Option<usize> {
    let end = skip_trivia(s, i, CASSANDRA);
    let mut k = i;
    while k < end {
        k = match s.as_bytes()[k] {
            b' ' | b'\t' | b'\n' | b'\r' => k + 1,
            _ => comment_end(s, k, CASSANDRA)?,
        };
    }
    Some(end)
}

/// The first word as `lexer` would see it, lowercased, at most 8 letters. With
/// `delete_comments` a comment joins what surrounds it (`U/**/SE ks` is `use` to such a parser;
/// the emulator's engine is one) and stray non-ASCII and control characters inside the word are
/// deleted too; otherwise a comment ends the word.
fn first_word(s: &str, lexer: Lexer, delete_comments: bool) -> String {
    let mut i = skip_trivia(s, 0, lexer);
    let mut word = String::new();
    while word.len() < 8 {
        if let Some(end) = comment_end(s, i, lexer) {
            if !delete_comments {
                break;
            }
            i = end;
        } else {
            match s[i..].chars().next() {
                Some(c) if c.is_ascii_alphanumeric() || c == '_' => {
                    word.push(c.to_ascii_lowercase());
                    i += 1;
                }
                Some(c)
                    if delete_comments
                        && (!c.is_ascii() || (c.is_control() && !c.is_ascii_whitespace())) =>
                {
                    i += c.len_utf8();
                }
                _ => break,
            }
        }
    }
    word
}

pub(crate) fn classify_use(cql: &str) -> UseStatement {
    let start = skip_trivia(cql, 0, CASSANDRA);
    let end = word_end(cql, start);
    if cql[start..end].eq_ignore_ascii_case("use") {
        return parse_use_rest(cql, start, end).map_or(UseStatement::Unparsable, UseStatement::Use);
    }
    // Not USE to Cassandra's lexer, but USE to another one (or to one that deletes
    // comments): refused, never forwarded.
    let deleting = first_word(cql, CASSANDRA, true) == "use";
    let elsewhere = || {
        OTHER_LEXERS
            .iter()
            .any(|l| first_word(cql, *l, false) == "use" || first_word(cql, *l, true) == "use")
    };
    if deleting || elsewhere() {
        return UseStatement::Unparsable;
    }
    UseStatement::NotUse
}

fn parse_use_rest(cql: &str, start: usize, keyword_end: usize) -> Option<String> {
    // The separators before USE must be the grammar's too.
    if strict_trivia(cql, 0)? != start {
        return None;
    }
    let name_start = strict_trivia(cql, keyword_end)?;
    // `USE"ks"` is two tokens, `USEks` one word: a name needs a separator or a quote.
    if name_start == keyword_end && cql.as_bytes().get(name_start) != Some(&b'"') {
        return None;
    }
    let (keyspace, name_end) = keyspace_at(cql, name_start)?;
    let mut i = strict_trivia(cql, name_end)?;
    if cql.as_bytes().get(i) == Some(&b';') {
        i = strict_trivia(cql, i + 1)?;
    }
    (i == cql.len()).then_some(keyspace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use UseStatement::*;

    fn ks(name: &str) -> UseStatement {
        Use(name.to_owned())
    }

    #[test]
    fn exact_spellings_are_parsed() {
        for (cql, want) in [
            ("USE ks", ks("ks")),
            ("  use MyKs ; ", ks("myks")),
            ("USE \"MyKs\"", ks("MyKs")),
            ("USE \"a\"\"b\"", ks("a\"b")),
            ("USE\"Quoted\"", ks("Quoted")),
            ("use\tks;", ks("ks")),
            ("\r\nUSE\nks\r\n", ks("ks")),
            ("USE ks -- trailing note", ks("ks")),
            ("USE ks // trailing note\n", ks("ks")),
            ("/* lead */ USE /* mid */ ks /* end */ ;", ks("ks")),
            ("-- comment line\nUSE ks", ks("ks")),
            ("USE ks; -- done", ks("ks")),
            ("USE ks_2", ks("ks_2")),
            // Cassandra ends line comments at \r too (the proxy sends `USE "ks"` upstream, so
            // a server that does not reads the same statement).
            ("-- note\rUSE ks", ks("ks")),
            ("// note\rUSE ks", ks("ks")),
            ("/*/ */USE ks", ks("ks")),
        ] {
            assert_eq!(classify_use(cql), want, "{cql:?}");
        }
    }

    #[test]
    fn anything_else_starting_with_use_is_refused() {
        for cql in [
            "USE",
            "USE ;",
            "USE ks.t",
            "USE ks other",
            "USE ks; SELECT * FROM t",
            "USE ks;;",
            "USE \"\"",
            "USE \"unterminated",
            "USE 1ks",
            "USE \u{a0}ks",
            "\u{a0}USE ks",
            "\u{feff}USE ks",
            "USE\u{0c}ks",
            "use ks\u{0}",
            "/* unterminated USE ks",
            "U/**/SE ks2",
            "us/* x */e ks2",
            "U--x\nSE ks",
            "U\u{200b}SE ks",
            "U/**/SE\"ks\"",
            "/*/USE ks",
            "u/*/se ks",
            "/* /* */ */ USE ks",
        ] {
            let got = classify_use(cql);
            assert!(
                got == Unparsable || (got == NotUse && cql == "/* unterminated USE ks"),
                "{cql:?}: {got:?}"
            );
        }
    }

    #[test]
    fn other_statements_are_not_use() {
        for cql in [
            "USER ks",
            "USEks",
            "SELECT * FROM use",
            "INSERT INTO t (use) VALUES (1)",
            "",
            "   ",
            "-- only a comment",
            "\"USE\" ks",
            "USEful",
            "U/**/SEks",
            "UPDATE t SET use = 1",
        ] {
            assert_eq!(classify_use(cql), NotUse, "{cql:?}");
        }
    }
}
