//! Comments in CQL text, as Cassandra's lexer reads them and as other lexers might: what
//! decides whether a statement is a `USE` (fail-closed, under every lexer here) and which table
//! it reads.

/// How a lexer ends a block comment. Cassandra's ends it at the first `*/` after the `/*`;
/// others read `/*/` as a whole comment or nest comments. A statement is only let through as
/// "not USE" when no lexer in this list sees USE first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Block {
    Cassandra,
    Overlapping,
    Nested,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lexer {
    pub(crate) block: Block,
    /// Cassandra ends `--`/`//` comments at `\n` or `\r`; some lexers only at `\n`.
    pub(crate) line_ends_at_cr: bool,
}

pub(crate) const CASSANDRA: Lexer = Lexer {
    block: Block::Cassandra,
    line_ends_at_cr: true,
};

pub(crate) const OTHER_LEXERS: [Lexer; 5] = [
    Lexer {
        block: Block::Cassandra,
        line_ends_at_cr: false,
    },
    Lexer {
        block: Block::Overlapping,
        line_ends_at_cr: true,
    },
    Lexer {
        block: Block::Overlapping,
        line_ends_at_cr: false,
    },
    Lexer {
        block: Block::Nested,
        line_ends_at_cr: true,
    },
    Lexer {
        block: Block::Nested,
        line_ends_at_cr: false,
    },
];

/// The end of the comment starting at `i` (`--` or `//` to the end of the line, `/* */`), if
/// one starts there. An unterminated comment runs to the end.
pub(crate) fn comment_end(s: &str, i: usize, lexer: Lexer) -> Option<usize> {
    let rest = &s[i..];
    if rest.starts_with("--") || rest.starts_with("//") {
        let eol = if lexer.line_ends_at_cr {
            rest.find(['\n', '\r'])
        } else {
            rest.find('\n')
        };
        return Some(eol.map_or(s.len(), |n| i + n + 1));
    }
    let body = rest.strip_prefix("/*")?;
    let end = match lexer.block {
        Block::Cassandra => body.find("*/").map(|n| 2 + n + 2),
        Block::Overlapping => rest[1..].find("*/").map(|n| 1 + n + 2),
        Block::Nested => {
            let (mut depth, mut k) = (1usize, 2);
            let b = rest.as_bytes();
            while depth > 0 && k + 1 < b.len() {
                match &b[k..k + 2] {
                    b"/*" => (depth, k) = (depth + 1, k + 2),
                    b"*/" => (depth, k) = (depth - 1, k + 2),
                    _ => k += 1,
                }
            }
            (depth == 0).then_some(k)
        }
    };
    Some(end.map_or(s.len(), |n| i + n))
}

/// Skips what might separate tokens for some parser: white space, control characters, any
/// non-ASCII character (a byte-order mark) and comments.
pub(crate) fn skip_trivia(s: &str, mut i: usize, lexer: Lexer) -> usize {
    loop {
        if let Some(end) = comment_end(s, i, lexer) {
            i = end;
        } else if let Some(c) = s[i..]
            .chars()
            .next()
            .filter(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
        {
            i += c.len_utf8();
        } else {
            return i;
        }
    }
}

/// The text with every comment and string literal (Cassandra's lexing: `'…'` with `''`
/// escapes, `$$…$$`) replaced by a space, as the lexer separates tokens; quoted names (`"…"`)
/// are kept, quotes included. Comment markers inside literals and names are not comments.
pub(crate) fn without_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        if let Some(end) = comment_end(s, i, CASSANDRA) {
            out.push(' ');
            i = end;
        } else if rest.starts_with('\'') {
            out.push(' ');
            i = quoted_end(s, i, '\'');
        } else if rest.starts_with('"') {
            let end = quoted_end(s, i, '"');
            out.push_str(&s[i..end]);
            i = end;
        } else if let Some(body) = rest.strip_prefix("$$") {
            out.push(' ');
            i = body.find("$$").map_or(s.len(), |n| i + 2 + n + 2);
        } else if let Some(c) = rest.chars().next() {
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// The end of the quoted token starting at `i` (`quote` doubled inside is an escaped quote);
/// an unterminated one runs to the end.
fn quoted_end(s: &str, i: usize, quote: char) -> usize {
    let b = s.as_bytes();
    let q = quote as u8;
    let mut k = i + 1;
    while k < b.len() {
        if b[k] == q {
            if b.get(k + 1) == Some(&q) {
                k += 2;
                continue;
            }
            return k + 1;
        }
        k += 1;
    }
    s.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_become_spaces() {
        assert_eq!(
            without_comments("SELECT/* a */x -- b\rFROM // c\n t"),
            "SELECT x  FROM   t"
        );
        assert_eq!(without_comments("a /* open"), "a  ");
        assert_eq!(
            without_comments("x = 'it''s -- no comment' AND \"a--b\" /* c */ $$ -- $$ y"),
            "x =   AND \"a--b\"     y"
        );
    }
}
