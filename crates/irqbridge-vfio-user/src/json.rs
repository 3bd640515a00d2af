// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The JSON of VERSION capabilities, read and written without a JSON library.
//!
//! Both roles exchange one small document (`{"capabilities":{...}}`), so [`crate::proto`]
//! carries its own codec instead of pulling serde into the client (the `irqbridge-kvm`
//! plugin's dependency tree stays free of it). The reader accepts any RFC 8259 document
//! (unknown keys of any shape are skipped) with nesting up to [`MAX_DEPTH`]; the caller
//! extracts the few typed fields it knows.

use std::fmt;

/// Deepest nesting of arrays and objects accepted (a peer's document is hostile input).
pub const MAX_DEPTH: usize = 32;

/// Why a capabilities document was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonError {
    /// Byte offset in the text where the problem was found (0 for type errors).
    pub offset: usize,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.reason, self.offset)
    }
}

impl std::error::Error for JsonError {}

/// A parsed JSON value. Numbers keep their text; [`Value::as_u64`] accepts only non-negative
/// integers without fraction or exponent (as serde does for unsigned fields).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Number(String),
    String(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

pub(crate) fn type_error(what: &str, expected: &str) -> JsonError {
    JsonError {
        offset: 0,
        reason: format!("{what}: {expected} expected"),
    }
}

impl Value {
    /// The value as a `u64`, or a type error naming `what`.
    pub(crate) fn as_u64(&self, what: &str) -> Result<u64, JsonError> {
        match self {
            Value::Number(t) if t.bytes().all(|b| b.is_ascii_digit()) => t
                .parse()
                .map_err(|_| type_error(what, "an integer within 64 bits")),
            _ => Err(type_error(what, "a non-negative integer")),
        }
    }

    /// The value as a `u32`.
    pub(crate) fn as_u32(&self, what: &str) -> Result<u32, JsonError> {
        u32::try_from(self.as_u64(what)?).map_err(|_| type_error(what, "an integer within 32 bits"))
    }

    /// The value as a `bool`.
    pub(crate) fn as_bool(&self, what: &str) -> Result<bool, JsonError> {
        match self {
            Value::Bool(b) => Ok(*b),
            _ => Err(type_error(what, "a boolean")),
        }
    }

    /// The members of an object (duplicate keys are an error, as with serde's derive).
    pub(crate) fn members(&self, what: &str) -> Result<&[(String, Value)], JsonError> {
        match self {
            Value::Object(m) => {
                for (i, (k, _)) in m.iter().enumerate() {
                    if m.iter().skip(i + 1).any(|(k2, _)| k2 == k) {
                        return Err(type_error(what, &format!("one \"{k}\" key")));
                    }
                }
                Ok(m)
            }
            _ => Err(type_error(what, "an object")),
        }
    }
}

/// Parses a whole document (surrounding whitespace allowed, nothing else).
pub(crate) fn parse(text: &str) -> Result<Value, JsonError> {
    let mut p = Parser {
        b: text.as_bytes(),
        pos: 0,
    };
    let v = p.value(0)?;
    p.ws();
    if p.pos != p.b.len() {
        return Err(p.err("trailing characters"));
    }
    Ok(v)
}

struct Parser<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, reason: &str) -> JsonError {
        JsonError {
            offset: self.pos,
            reason: reason.to_owned(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Result<(), JsonError> {
        self.ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(&format!("'{}' expected", c as char)))
        }
    }

    fn literal(&mut self, word: &str, v: Value) -> Result<Value, JsonError> {
        if self.b.get(self.pos..self.pos + word.len()) == Some(word.as_bytes()) {
            self.pos += word.len();
            Ok(v)
        } else {
            Err(self.err("unknown literal"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, JsonError> {
        self.ws();
        match self.peek() {
            Some(b'{') | Some(b'[') if depth >= MAX_DEPTH => Err(self.err("nested too deeply")),
            Some(b'{') => {
                self.pos += 1;
                let mut members = Vec::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.eat(b':')?;
                    let v = self.value(depth + 1)?;
                    members.push((key, v));
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b'}') => {
                            self.pos += 1;
                            return Ok(Value::Object(members));
                        }
                        _ => return Err(self.err("',' or '}' expected")),
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(Value::Array(items));
                        }
                        _ => return Err(self.err("',' or ']' expected")),
                    }
                }
            }
            Some(b'"') => Ok(Value::String(self.string()?)),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.err("value expected")),
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<Value, JsonError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let int_start = self.pos;
        let n = self.digits();
        if n == 0 || (n > 1 && self.b.get(int_start) == Some(&b'0')) {
            return Err(self.err("malformed number"));
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.err("malformed number"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("malformed number"));
            }
        }
        let text = self.b.get(start..self.pos).unwrap_or_default();
        Ok(Value::Number(String::from_utf8_lossy(text).into_owned()))
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let s = self
            .b
            .get(self.pos..self.pos + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| self.err("bad \\u escape"))?;
        self.pos += 4;
        Ok(s)
    }

    fn string(&mut self) -> Result<String, JsonError> {
        if self.peek() != Some(b'"') {
            return Err(self.err("string expected"));
        }
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let c = self.peek().ok_or_else(|| self.err("unterminated string"))?;
            self.pos += 1;
            match c {
                b'"' => break,
                0..=0x1f => return Err(self.err("control character in string")),
                b'\\' => {
                    let e = self.peek().ok_or_else(|| self.err("unterminated string"))?;
                    self.pos += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xd800..0xdc00).contains(&hi) {
                                if self.b.get(self.pos..self.pos + 2) != Some(b"\\u") {
                                    return Err(self.err("lone surrogate"));
                                }
                                self.pos += 2;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err(self.err("lone surrogate"));
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            char::from_u32(code).ok_or_else(|| self.err("lone surrogate"))?
                        }
                        _ => return Err(self.err("bad escape")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                other => out.push(other),
            }
        }
        // The input is a &str and escapes produce whole characters, so this cannot fail.
        String::from_utf8(out).map_err(|_| self.err("invalid UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_of_value() {
        let v =
            parse(r#" {"a": [1, -2.5e3, true, false, null, "x\"\u00e9\ud83d\ude00"], "b": {}} "#)
                .unwrap();
        let m = v.members("doc").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0].1,
            Value::Array(vec![
                Value::Number("1".into()),
                Value::Number("-2.5e3".into()),
                Value::Bool(true),
                Value::Bool(false),
                Value::Null,
                Value::String("x\"é😀".into()),
            ])
        );
        assert_eq!(m[1].1, Value::Object(Vec::new()));
    }

    #[test]
    fn rejects_malformed_documents() {
        for bad in [
            "",
            "{",
            "{\"a\"}",
            "{\"a\":1,}",
            "[1 2]",
            "01",
            "1.",
            "-",
            "1e",
            "tru",
            "\"\\x\"",
            "\"\\ud800\"",
            "\"a\nb\"",
            "{} x",
            "{'a':1}",
            "\"unterminated",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse(&deep).is_ok());
        let deeper = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(parse(&deeper).is_err());
        // A hostile depth fails cleanly instead of exhausting the stack.
        assert!(parse(&"[".repeat(100_000)).is_err());
    }

    #[test]
    fn typed_accessors_follow_serde_rules() {
        let n = |t: &str| parse(t).unwrap();
        assert_eq!(n("18446744073709551615").as_u64("x").unwrap(), u64::MAX);
        assert!(n("18446744073709551616").as_u64("x").is_err());
        assert!(n("-1").as_u64("x").is_err());
        assert!(n("1.0").as_u64("x").is_err());
        assert!(n("1e3").as_u64("x").is_err());
        assert_eq!(n("4294967295").as_u32("x").unwrap(), u32::MAX);
        assert!(n("4294967296").as_u32("x").is_err());
        assert!(n("\"1\"").as_u64("x").is_err());
        assert!(n("1").as_bool("x").is_err());
        assert!(n(r#"{"a":1,"a":2}"#).members("x").is_err());
    }
}
