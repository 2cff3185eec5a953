//! How journal files look on disk.
//!
//! A segment is lines: a header naming the database its records are for,
//! then one record per line. Every line is the CRC-32 of its JSON (8 hex
//! digits), a space, the JSON, and a newline, so a line cut short by a
//! crash or scrambled on disk is recognised rather than parsed as data.
//! Lines of the first format (bare JSON, no header) are still read.

use std::path::Path;

use flywheel_store::instance::DatabaseIdentity;
use serde::{Deserialize, Serialize};

use super::record::Record;

/// The current format's number, in every header.
pub const FORMAT: u32 = 2;

/// The first line of a segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub journal: u32,
    pub database: DatabaseIdentity,
}

/// A line for `value`: checksum, space, JSON, newline.
pub fn encode(value: &impl Serialize) -> std::io::Result<Vec<u8>> {
    let json = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let mut line = format!("{:08x} ", crc32fast::hash(&json)).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    Ok(line)
}

/// The JSON of one line (without its newline), checked against its sum.
pub fn decode(line: &[u8]) -> Result<&[u8], &'static str> {
    if line.first() == Some(&b'{') {
        return Ok(line); // format 1: no checksum
    }
    let (sum, json) = match line.split_at_checked(9) {
        Some((sum, json)) if sum[8] == b' ' => (&sum[..8], json),
        _ => return Err("no checksum"),
    };
    let sum = std::str::from_utf8(sum)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or("no checksum")?;
    if crc32fast::hash(json) != sum {
        return Err("checksum mismatch");
    }
    Ok(json)
}

/// A line that could not be read back, kept as text for a person.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    pub line: usize,
    pub text: String,
    pub why: String,
}

/// Everything one segment file holds.
#[derive(Debug, Default)]
pub struct Contents {
    pub header: Option<Header>,
    pub records: Vec<Record>,
    /// A last line cut short: a write the process (or the machine) did not
    /// finish. Never acknowledged unless the sync policy was `never`.
    pub torn: usize,
    /// Lines before the last that fail their checksum or do not parse:
    /// damage on disk, kept aside as text.
    pub corrupt: Vec<Unreadable>,
}

pub fn read_segment(path: &Path) -> std::io::Result<Contents> {
    let bytes = std::fs::read(path)?;
    let mut out = Contents::default();
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    // A file that ends in a newline splits into a last empty piece; one
    // that does not ends in a write cut short.
    match lines.pop() {
        Some(rest) if !rest.is_empty() => out.torn += 1,
        _ => {}
    }
    let last = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        let parsed = decode(line).map_err(str::to_string).and_then(|json| {
            if i == 0
                && let Ok(h) = serde_json::from_slice::<Header>(json)
            {
                return Ok(Err(h));
            }
            serde_json::from_slice::<Record>(json)
                .map(Ok)
                .map_err(|e| e.to_string())
        });
        match parsed {
            Ok(Ok(rec)) => out.records.push(rec),
            Ok(Err(header)) => out.header = Some(header),
            // The last complete line failing is a torn write too (a crash
            // between the data and the size reaching the disk).
            Err(_) if i + 1 == last => out.torn += 1,
            Err(why) => out.corrupt.push(Unreadable {
                line: i + 1,
                text: String::from_utf8_lossy(line).into_owned(),
                why,
            }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_damage_is_caught() {
        let line = encode(&serde_json::json!({"a": 1})).unwrap();
        assert!(line.ends_with(b"\n"));
        let body = &line[..line.len() - 1];
        assert_eq!(decode(body).unwrap(), br#"{"a":1}"#);
        let mut flipped = body.to_vec();
        let last = flipped.len() - 2;
        flipped[last] = b'2';
        assert_eq!(decode(&flipped), Err("checksum mismatch"));
        assert_eq!(decode(b"garbage"), Err("no checksum"));
        assert!(decode(br#"{"legacy": true}"#).is_ok());
    }
}
