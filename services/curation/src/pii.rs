//! PII redaction: e-mail addresses, IBANs, payment card numbers, IP
//! addresses and phone numbers are replaced by a placeholder before text
//! enters a dataset. Candidates that look like card numbers or IBANs are
//! checked (Luhn, ISO 13616 mod 97) so ordinary long numbers survive.

use std::sync::OnceLock;

use regex::Regex;
use serde::Serialize;

/// What was replaced, by kind, for the dataset manifest.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Redactions {
    pub emails: usize,
    pub ibans: usize,
    pub cards: usize,
    pub ips: usize,
    pub phones: usize,
}

impl Redactions {
    pub fn total(&self) -> usize {
        self.emails + self.ibans + self.cards + self.ips + self.phones
    }

    pub fn add(&mut self, other: &Redactions) {
        self.emails += other.emails;
        self.ibans += other.ibans;
        self.cards += other.cards;
        self.ips += other.ips;
        self.phones += other.phones;
    }
}

/// The rules in the order they run, for the manifest.
pub const RULES: &[(&str, &str)] = &[
    ("email", "local@domain.tld -> [EMAIL]"),
    (
        "iban",
        "2 letters, 2 check digits, 11-30 alphanumerics, valid mod 97 -> [IBAN]",
    ),
    (
        "card",
        "13-19 digits (spaces or dashes allowed), valid Luhn checksum -> [CARD]",
    ),
    ("ip", "IPv4 dotted quad (each part <= 255) or IPv6 -> [IP]"),
    (
        "phone",
        "9-15 digits with optional +, spaces, dots, dashes, parentheses -> [PHONE]",
    ),
];

struct Patterns {
    email: Regex,
    iban: Regex,
    card: Regex,
    ipv4: Regex,
    ipv6: Regex,
    phone: Regex,
}

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    P.get_or_init(|| Patterns {
        email: Regex::new(r"(?i)\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b").expect("email regex"),
        iban: Regex::new(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b").expect("iban regex"),
        card: Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").expect("card regex"),
        ipv4: Regex::new(r"\b(?:\d{1,3}\.){3}\d{1,3}\b").expect("ipv4 regex"),
        ipv6: Regex::new(r"(?i)\b(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}\b").expect("ipv6 regex"),
        phone: Regex::new(r"(?:\+\d{1,3}[\s.-]?|\(\d{1,4}\)[\s.-]?|\b)\d(?:[\s.-]?\d){7,13}\b")
            .expect("phone regex"),
    })
}

fn digits(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

/// Luhn checksum, as payment cards use.
pub fn luhn_valid(number: &str) -> bool {
    let d = digits(number);
    if !(13..=19).contains(&d.len()) {
        return false;
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                if x * 2 > 9 { x * 2 - 9 } else { x * 2 }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// ISO 13616 IBAN check: move the first four characters to the end, turn
/// letters into numbers (A = 10), and the result mod 97 must be 1.
pub fn iban_valid(candidate: &str) -> bool {
    let s: String = candidate.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&s.len()) {
        return false;
    }
    let (head, tail) = s.split_at(4);
    let mut rem = 0u32;
    for c in tail.chars().chain(head.chars()) {
        let v = match c {
            '0'..='9' => c as u32 - '0' as u32,
            'A'..='Z' => c as u32 - 'A' as u32 + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn replace_checked(
    text: &str,
    re: &Regex,
    placeholder: &str,
    valid: impl Fn(&str) -> bool,
    count: &mut usize,
) -> String {
    re.replace_all(text, |caps: &regex::Captures<'_>| {
        let m = &caps[0];
        if valid(m) {
            *count += 1;
            placeholder.to_string()
        } else {
            m.to_string()
        }
    })
    .into_owned()
}

/// Replaces every recognised piece of PII in `text`.
pub fn redact(text: &str) -> (String, Redactions) {
    let p = patterns();
    let mut r = Redactions::default();
    let t = replace_checked(text, &p.email, "[EMAIL]", |_| true, &mut r.emails);
    let t = replace_checked(&t, &p.iban, "[IBAN]", iban_valid, &mut r.ibans);
    let t = replace_checked(&t, &p.card, "[CARD]", luhn_valid, &mut r.cards);
    let mut ips = 0;
    let t = replace_checked(
        &t,
        &p.ipv4,
        "[IP]",
        |m| m.split('.').all(|part| part.parse::<u8>().is_ok()),
        &mut ips,
    );
    let t = replace_checked(
        &t,
        &p.ipv6,
        "[IP]",
        |m| m.parse::<std::net::Ipv6Addr>().is_ok(),
        &mut ips,
    );
    r.ips = ips;
    let t = replace_checked(
        &t,
        &p.phone,
        "[PHONE]",
        |m| (9..=15).contains(&digits(m).len()),
        &mut r.phones,
    );
    (t, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_replaced_and_counted() {
        let text = "Mail ann.lee+x@example.co.uk, IBAN GB82 WEST 1234 5698 7654 32, card 4111 1111 1111 1111, \
                    server 192.168.0.12 or 2001:db8::8a2e:370:7334, call +44 20 7946 0958.";
        let (out, r) = redact(text);
        assert_eq!(
            out,
            "Mail [EMAIL], IBAN [IBAN], card [CARD], server [IP] or [IP], call [PHONE]."
        );
        assert_eq!(
            r,
            Redactions {
                emails: 1,
                ibans: 1,
                cards: 1,
                ips: 2,
                phones: 1
            }
        );
        assert_eq!(r.total(), 6);
    }

    #[test]
    fn checksums_keep_ordinary_numbers() {
        // Fails Luhn: not a card (long digit runs may still go as phones,
        // which errs on the side of removing).
        let (_, r) = redact("order 4111 1111 1111 1112");
        assert_eq!(r.cards, 0);
        let (out, r) = redact("it costs 1999.99 in 2024, ticket 12345");
        assert_eq!(
            (out.as_str(), r.total()),
            ("it costs 1999.99 in 2024, ticket 12345", 0)
        );
        let (out, r) = redact("version 1.2.3.4000 and 300.1.1.1");
        assert_eq!(
            (r.ips, out.as_str()),
            (0, "version 1.2.3.4000 and 300.1.1.1")
        );
        // A wrong IBAN check digit.
        assert!(!iban_valid("GB83WEST12345698765432"));
        assert!(iban_valid("DE89 3704 0044 0532 0130 00"));
    }

    #[test]
    fn text_without_pii_is_untouched() {
        let text = "The capital of France is Paris. 2 + 2 = 4.";
        assert_eq!(redact(text), (text.to_string(), Redactions::default()));
    }

    #[test]
    fn luhn_known_values() {
        assert!(luhn_valid("4012888888881881"));
        assert!(luhn_valid("378282246310005"));
        assert!(!luhn_valid("378282246310006"));
        assert!(!luhn_valid("12345"));
    }
}
