//! Constrained decoding for `response_format`: at each step only tokens
//! that keep the output a valid prefix of JSON (any object, for
//! `json_object`) or of an instance of a JSON schema (`json_schema`) may be
//! sampled, as llama.cpp's grammars and outlines do; the end-of-turn token
//! is allowed only once the value is complete. A schema whose property says
//! `"enum": [...]` cannot get a value outside the list.
//!
//! The schema subset is OpenAI's strict mode: the root is an object; every
//! property is written, in the order given (strict mode requires them all);
//! `type` (one of object, array, string, number, integer, boolean, null),
//! `properties`, `items`, `enum`, `const`. Keywords that would constrain
//! more than this checks (`pattern`, `minLength`, `anyOf`, `$ref`, ...)
//! are refused when the request arrives rather than silently ignored;
//! `description`, `title`, `required`, `additionalProperties`, `strict`
//! and `$schema` are accepted (they say nothing this does not already do).
//!
//! The output is compact, as OpenAI's is (`{"intent":"refund","n":1}`): no
//! whitespace between JSON tokens, so a model cannot pad its answer with
//! newlines the grammar would otherwise allow, and every byte the schema
//! leaves no choice over (a key, `":"`, the rest of an enum value once its
//! start is unique) is known in advance: [`Matcher::forced`] returns them,
//! and the engine appends them without a forward pass each (jump-forward).
//!
//! [`Matcher`] reads the output byte by byte (tokens are byte-level BPE
//! pieces, so a token may end inside a UTF-8 character: bytes of 0x80 and
//! above are string content) with a stack of frames, one per open value.

use std::sync::Arc;

/// What a value must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// Any JSON value.
    Any,
    /// An object with any keys (`json_object`, or `type: object` without
    /// `properties`).
    AnyObject,
    /// An object with exactly these properties, in this order.
    Object(Vec<(String, Arc<Node>)>),
    Array(Arc<Node>),
    String,
    Number {
        integer: bool,
    },
    Boolean,
    Null,
    /// One of these values, each as its exact JSON text.
    Enum(Vec<Vec<u8>>),
    /// A value of any of these types (`"type": ["string", "null"]`): each
    /// JSON type starts with its own bytes, so the first byte chooses.
    OneOf(Vec<Arc<Node>>),
}

impl Node {
    /// The root of `response_format: {"type": "json_object"}`.
    pub fn json_object() -> Arc<Node> {
        Arc::new(Node::AnyObject)
    }

    /// `response_format` as OpenAI's API takes it: `text` (`None`);
    /// `json_object` (any JSON object); `json_schema` with
    /// `json_schema.schema`.
    pub fn from_response_format(value: &serde_json::Value) -> Result<Option<Arc<Node>>, String> {
        match value["type"].as_str() {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Node::json_object())),
            Some("json_schema") => {
                let schema = value["json_schema"]
                    .get("schema")
                    .ok_or("response_format.json_schema.schema is required")?;
                Node::from_schema(schema)
                    .map(Some)
                    .map_err(|e| format!("response_format.json_schema: {e}"))
            }
            _ => Err(format!(
                "response_format type {} is not supported; use \"text\", \"json_object\" or \"json_schema\"",
                value["type"]
            )),
        }
    }

    /// Compiles a JSON schema (see the module's notes for the subset); the
    /// root must be an object.
    pub fn from_schema(schema: &serde_json::Value) -> Result<Arc<Node>, String> {
        let root = compile(schema, "schema")?;
        match root {
            Node::Object(_) | Node::AnyObject => Ok(Arc::new(root)),
            _ => Err("the schema's root must be an object (`\"type\": \"object\"`)".into()),
        }
    }
}

const IGNORED: [&str; 7] = [
    "description",
    "title",
    "required",
    "additionalProperties",
    "strict",
    "$schema",
    "type",
];

fn compile(s: &serde_json::Value, at: &str) -> Result<Node, String> {
    let obj = s
        .as_object()
        .ok_or_else(|| format!("{at} must be a JSON object"))?;
    for key in obj.keys() {
        let known = IGNORED.contains(&key.as_str())
            || matches!(key.as_str(), "properties" | "items" | "enum" | "const");
        if !known {
            return Err(format!(
                "{at}: the keyword `{key}` is not supported for constrained decoding"
            ));
        }
    }
    let values = match (obj.get("enum"), obj.get("const")) {
        (Some(serde_json::Value::Array(v)), _) if !v.is_empty() => Some(v.clone()),
        (Some(_), _) => return Err(format!("{at}.enum must be a non-empty array")),
        (None, Some(c)) => Some(vec![c.clone()]),
        (None, None) => None,
    };
    if let Some(values) = values {
        return Ok(Node::Enum(
            values
                .iter()
                .map(|v| serde_json::to_vec(v).unwrap_or_default())
                .collect(),
        ));
    }
    let ty = match obj.get("type") {
        None => return Ok(Node::Any),
        Some(serde_json::Value::String(t)) => t.as_str(),
        Some(serde_json::Value::Array(types)) if !types.is_empty() => {
            // Nullable fields and other unions: the schema once per type.
            let mut alts = Vec::new();
            let mut starts = std::collections::HashSet::new();
            for t in types {
                let Some(name) = t.as_str() else {
                    return Err(format!("{at}.type must list type names"));
                };
                let first = if name == "integer" { "number" } else { name };
                if !starts.insert(first) {
                    return Err(format!("{at}.type lists `{first}` twice"));
                }
                let mut one = obj.clone();
                one.insert("type".into(), t.clone());
                alts.push(Arc::new(compile(&serde_json::Value::Object(one), at)?));
            }
            return Ok(Node::OneOf(alts));
        }
        Some(_) => return Err(format!("{at}.type must be a type name or a list of them")),
    };
    Ok(match ty {
        "object" => match obj.get("properties") {
            None => Node::AnyObject,
            Some(serde_json::Value::Object(props)) => Node::Object(
                props
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), Arc::new(compile(v, &format!("{at}.{k}"))?))))
                    .collect::<Result<_, String>>()?,
            ),
            Some(_) => return Err(format!("{at}.properties must be an object")),
        },
        "array" => match obj.get("items") {
            None => Node::Array(Arc::new(Node::Any)),
            Some(items) => Node::Array(Arc::new(compile(items, &format!("{at}.items"))?)),
        },
        "string" => Node::String,
        "number" => Node::Number { integer: false },
        "integer" => Node::Number { integer: true },
        "boolean" => Node::Boolean,
        "null" => Node::Null,
        other => return Err(format!("{at}.type `{other}` is not a JSON schema type")),
    })
}

/// The longest run of forced bytes returned at once (a `const` can be
/// long; what is left is returned by the next call).
const MAX_FORCED: usize = 512;

/// Digits in a row in a number (18 keeps an integer within i64; a model
/// left free would otherwise write digits until `max_tokens`).
const MAX_DIGITS: u8 = 18;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Sign,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Esc {
    No,
    Backslash,
    Unicode(u8),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ObjAt {
    /// After `{` or `,`: the next key (or `}` where allowed).
    Key {
        first: bool,
    },
    AfterKey,
    AfterValue,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ArrAt {
    First,
    Next,
    AfterValue,
}

#[derive(Debug, Clone)]
enum Frame {
    Value(Arc<Node>),
    Object {
        node: Arc<Node>,
        field: usize,
        at: ObjAt,
    },
    FreeObject(ObjAt),
    Array {
        item: Arc<Node>,
        at: ArrAt,
    },
    String(Esc),
    Number {
        integer: bool,
        at: Num,
        /// Digits in the current run (integer part, fraction or exponent).
        digits: u8,
    },
    /// Exact text (a literal or a property's key), `pos` bytes read.
    Literal {
        text: Arc<[u8]>,
        pos: usize,
    },
    Enum {
        node: Arc<Node>,
        alive: Vec<usize>,
        pos: usize,
    },
}

enum Act {
    Took,
    Refused,
    /// The frames changed without taking the byte: read it again.
    Again,
}

/// Where the output stands against its constraint.
#[derive(Debug, Clone)]
pub struct Matcher {
    stack: Vec<Frame>,
}

fn literal(text: &[u8], pos: usize) -> Frame {
    Frame::Literal {
        text: Arc::from(text),
        pos,
    }
}

impl Matcher {
    pub fn new(root: Arc<Node>) -> Self {
        Self {
            stack: vec![Frame::Value(root)],
        }
    }

    /// The value is complete: only the end of the turn may follow.
    pub fn is_complete(&self) -> bool {
        self.stack.is_empty()
    }

    /// Whether `bytes` may come next (the matcher is left as it was).
    pub fn allows(&self, bytes: &[u8]) -> bool {
        !bytes.is_empty() && self.clone().feed(bytes)
    }

    /// Reads `bytes`; false (and the matcher in an undefined state) when
    /// they break the constraint.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.byte(b))
    }

    /// The bytes that must come next whatever the model prefers: the
    /// longest run in which each byte is the only one allowed (empty where
    /// the model has a choice, or once the value is complete).
    pub fn forced(&self) -> Vec<u8> {
        let mut m = self.clone();
        let mut run = Vec::new();
        while run.len() < MAX_FORCED && !m.is_complete() {
            let mut only = None;
            for b in 0..=u8::MAX {
                if m.allows(&[b]) {
                    if only.is_some() {
                        return run;
                    }
                    only = Some(b);
                }
            }
            let Some(b) = only else { return run };
            m.byte(b);
            run.push(b);
        }
        run
    }

    fn byte(&mut self, b: u8) -> bool {
        loop {
            match self.step(b) {
                Act::Took => return true,
                Act::Refused => return false,
                Act::Again => {}
            }
        }
    }

    fn step(&mut self, b: u8) -> Act {
        let Some(top) = self.stack.last_mut() else {
            return Act::Refused;
        };
        match top {
            Frame::Value(node) => {
                let node = node.clone();
                self.stack.pop();
                self.start(node, b)
            }
            Frame::Literal { text, pos } => {
                if text.get(*pos) != Some(&b) {
                    return Act::Refused;
                }
                *pos += 1;
                if *pos == text.len() {
                    self.stack.pop();
                }
                Act::Took
            }
            Frame::Enum { node, alive, pos } => {
                let Node::Enum(values) = node.as_ref() else {
                    return Act::Refused;
                };
                let next: Vec<usize> = alive
                    .iter()
                    .copied()
                    .filter(|&i| values[i].get(*pos) == Some(&b))
                    .collect();
                if next.is_empty() {
                    // A complete value (a number) ends at the next byte.
                    if alive.iter().any(|&i| values[i].len() == *pos) {
                        self.stack.pop();
                        return Act::Again;
                    }
                    return Act::Refused;
                }
                *pos += 1;
                let done = next.iter().all(|&i| values[i].len() == *pos);
                *alive = next;
                if done {
                    self.stack.pop();
                }
                Act::Took
            }
            Frame::String(esc) => match (*esc, b) {
                (Esc::No, b'"') => {
                    self.stack.pop();
                    Act::Took
                }
                (Esc::No, b'\\') => {
                    *esc = Esc::Backslash;
                    Act::Took
                }
                (Esc::No, b) if b < 0x20 => Act::Refused,
                (Esc::No, _) => Act::Took,
                (Esc::Backslash, b'u') => {
                    *esc = Esc::Unicode(0);
                    Act::Took
                }
                (Esc::Backslash, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                    *esc = Esc::No;
                    Act::Took
                }
                (Esc::Backslash, _) => Act::Refused,
                (Esc::Unicode(n), b) if b.is_ascii_hexdigit() => {
                    *esc = if n == 3 { Esc::No } else { Esc::Unicode(n + 1) };
                    Act::Took
                }
                (Esc::Unicode(_), _) => Act::Refused,
            },
            Frame::Number {
                integer,
                at,
                digits,
            } => {
                let next = match (*at, b) {
                    (Num::Sign, b'0') => Some(Num::Zero),
                    (Num::Sign, b'1'..=b'9') => Some(Num::Int),
                    (Num::Int, b'0'..=b'9') => Some(Num::Int),
                    (Num::Zero | Num::Int, b'.') if !*integer => Some(Num::Dot),
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') if !*integer => Some(Num::E),
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                    (Num::E, b'+' | b'-') => Some(Num::ESign),
                    (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Some(Num::Exp),
                    _ => None,
                };
                match next {
                    Some(n) if b.is_ascii_digit() && *digits >= MAX_DIGITS => {
                        let _ = n;
                        Act::Refused
                    }
                    Some(n) => {
                        *digits = if b.is_ascii_digit() { *digits + 1 } else { 0 };
                        *at = n;
                        Act::Took
                    }
                    None if matches!(at, Num::Zero | Num::Int | Num::Frac | Num::Exp) => {
                        self.stack.pop();
                        Act::Again
                    }
                    None => Act::Refused,
                }
            }
            Frame::Object { node, field, at } => {
                let Node::Object(props) = node.as_ref() else {
                    return Act::Refused;
                };
                match (*at, b) {
                    (ObjAt::Key { first: true }, b'}') if props.is_empty() => {
                        self.stack.pop();
                        Act::Took
                    }
                    (ObjAt::Key { .. }, b'"') if *field < props.len() => {
                        let key = serde_json::to_vec(&props[*field].0).unwrap_or_default();
                        *at = ObjAt::AfterKey;
                        self.stack.push(literal(&key, 1));
                        Act::Took
                    }
                    (ObjAt::AfterKey, b':') => {
                        let child = props[*field].1.clone();
                        *at = ObjAt::AfterValue;
                        self.stack.push(Frame::Value(child));
                        Act::Took
                    }
                    (ObjAt::AfterValue, b',') if *field + 1 < props.len() => {
                        *field += 1;
                        *at = ObjAt::Key { first: false };
                        Act::Took
                    }
                    (ObjAt::AfterValue, b'}') if *field + 1 == props.len() => {
                        self.stack.pop();
                        Act::Took
                    }
                    _ => Act::Refused,
                }
            }
            Frame::FreeObject(at) => match (*at, b) {
                (ObjAt::Key { first: true }, b'}') | (ObjAt::AfterValue, b'}') => {
                    self.stack.pop();
                    Act::Took
                }
                (ObjAt::Key { .. }, b'"') => {
                    *at = ObjAt::AfterKey;
                    self.stack.push(Frame::String(Esc::No));
                    Act::Took
                }
                (ObjAt::AfterKey, b':') => {
                    *at = ObjAt::AfterValue;
                    self.stack.push(Frame::Value(Arc::new(Node::Any)));
                    Act::Took
                }
                (ObjAt::AfterValue, b',') => {
                    *at = ObjAt::Key { first: false };
                    Act::Took
                }
                _ => Act::Refused,
            },
            Frame::Array { item, at } => match (*at, b) {
                (ArrAt::First | ArrAt::AfterValue, b']') => {
                    self.stack.pop();
                    Act::Took
                }
                (ArrAt::AfterValue, b',') => {
                    *at = ArrAt::Next;
                    Act::Took
                }
                (ArrAt::First | ArrAt::Next, _) => {
                    let item = item.clone();
                    *at = ArrAt::AfterValue;
                    self.stack.push(Frame::Value(item));
                    Act::Again
                }
                _ => Act::Refused,
            },
        }
    }

    /// The first byte of a value of `node`.
    fn start(&mut self, node: Arc<Node>, b: u8) -> Act {
        if let Node::OneOf(alts) = node.as_ref() {
            let depth = self.stack.len();
            for alt in alts {
                match self.start(alt.clone(), b) {
                    Act::Refused => self.stack.truncate(depth),
                    act => return act,
                }
            }
            return Act::Refused;
        }
        let any = matches!(node.as_ref(), Node::Any);
        let frame = match (node.as_ref(), b) {
            (Node::Enum(values), b) => {
                let alive: Vec<usize> = (0..values.len()).filter(|&i| values[i][0] == b).collect();
                if alive.is_empty() {
                    return Act::Refused;
                }
                let done = alive.iter().all(|&i| values[i].len() == 1);
                if done {
                    return Act::Took;
                }
                Frame::Enum {
                    node: node.clone(),
                    alive,
                    pos: 1,
                }
            }
            (Node::Object(_), b'{') => Frame::Object {
                node: node.clone(),
                field: 0,
                at: ObjAt::Key { first: true },
            },
            (Node::AnyObject | Node::Any, b'{') => Frame::FreeObject(ObjAt::Key { first: true }),
            (Node::Array(item), b'[') => Frame::Array {
                item: item.clone(),
                at: ArrAt::First,
            },
            (Node::Any, b'[') => Frame::Array {
                item: node.clone(),
                at: ArrAt::First,
            },
            (Node::String | Node::Any, b'"') => Frame::String(Esc::No),
            (Node::Number { integer }, b'-') => Frame::Number {
                integer: *integer,
                at: Num::Sign,
                digits: 0,
            },
            (Node::Number { integer }, b'0') => Frame::Number {
                integer: *integer,
                at: Num::Zero,
                digits: 1,
            },
            (Node::Number { integer }, b'1'..=b'9') => Frame::Number {
                integer: *integer,
                at: Num::Int,
                digits: 1,
            },
            (Node::Any, b'-' | b'0'..=b'9') => {
                self.stack.push(Frame::Number {
                    integer: false,
                    at: Num::Sign,
                    digits: 0,
                });
                if b == b'-' {
                    return Act::Took;
                }
                // Read the digit as the first one after an absent sign.
                return self.step(b);
            }
            (Node::Boolean, b't') => literal(b"true", 1),
            (Node::Boolean, b'f') => literal(b"false", 1),
            (Node::Null, b'n') => literal(b"null", 1),
            (_, b't') if any => literal(b"true", 1),
            (_, b'f') if any => literal(b"false", 1),
            (_, b'n') if any => literal(b"null", 1),
            _ => return Act::Refused,
        };
        self.stack.push(frame);
        Act::Took
    }
}

/// Tokens tried in logit order before the rest of the vocabulary is sorted.
const FIRST_TRIED: usize = 256;

/// The bytes of every token of a vocabulary (`None`: a special token,
/// never allowed inside constrained output).
pub type TokenBytes = [Option<Box<[u8]>>];

/// Masks `logits` to the tokens the matcher allows: the `keep`
/// highest-scoring allowed tokens keep their logits, every other token gets
/// minus infinity. Tokens are tried from the highest logit down, so a
/// greedy request (`keep` 1) usually tries a handful. The end-of-turn
/// tokens (`stop_ids`) are allowed exactly when the value is complete.
pub fn mask(logits: &mut [f32], m: &Matcher, bytes: &TokenBytes, stop_ids: &[u32], keep: usize) {
    let mut order: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| logits[i as usize].is_finite())
        .collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    // The best few first (most steps find their tokens there), then the
    // rest in order only if needed.
    let head = order.len().min(FIRST_TRIED.max(keep));
    if head < order.len() {
        order.select_nth_unstable_by(head, by_logit);
    }
    order[..head].sort_unstable_by(by_logit);
    let complete = m.is_complete();
    let mut allowed = Vec::with_capacity(keep);
    let mut tried = 0;
    while tried < order.len() {
        if tried == head {
            order[head..].sort_unstable_by(by_logit);
        }
        let id = order[tried];
        tried += 1;
        let ok = if stop_ids.contains(&id) {
            complete
        } else {
            !complete
                && bytes
                    .get(id as usize)
                    .and_then(|b| b.as_deref())
                    .is_some_and(|b| m.allows(b))
        };
        if ok {
            allowed.push(id);
            if allowed.len() == keep {
                break;
            }
        }
    }
    if allowed.is_empty() {
        // Nothing in the vocabulary continues the value (it cannot happen
        // with a byte-level vocabulary); end the turn rather than emit
        // something invalid.
        if let Some(&stop) = stop_ids.first() {
            allowed.push(stop);
        }
    }
    let kept: Vec<(u32, f32)> = allowed.iter().map(|&i| (i, logits[i as usize])).collect();
    logits.iter_mut().for_each(|l| *l = f32::NEG_INFINITY);
    for (i, l) in kept {
        logits[i as usize] = if l.is_finite() { l } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn router() -> Arc<Node> {
        Node::from_schema(&json!({
            "type": "object",
            "properties": {
                "intent": {"type": "string", "enum": ["track_order", "refund", "cancel_order"]},
                "order_id": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "urgent": {"type": "boolean"}
            },
            "required": ["intent", "order_id", "tags", "urgent"],
            "additionalProperties": false
        }))
        .unwrap()
    }

    fn accepts(root: &Arc<Node>, text: &str) -> bool {
        let mut m = Matcher::new(root.clone());
        m.feed(text.as_bytes()) && m.is_complete()
    }

    #[test]
    fn a_schema_admits_its_instances_and_nothing_else() {
        let r = router();
        assert!(accepts(
            &r,
            r#"{"intent":"refund","order_id":1234,"tags":["late","box"],"urgent":false}"#
        ));
        assert!(accepts(
            &r,
            r#"{"intent":"track_order","order_id":0,"tags":[],"urgent":true}"#
        ));
        for bad in [
            // An intent outside the enum, invented.
            r#"{"intent":"delivery_date","order_id":1,"tags":[],"urgent":true}"#,
            // Properties out of order, or one missing, or one extra.
            r#"{"order_id":1,"intent":"refund","tags":[],"urgent":true}"#,
            r#"{"intent":"refund","order_id":1,"tags":[]}"#,
            r#"{"intent":"refund","order_id":1,"tags":[],"urgent":true,"x":1}"#,
            // Wrong types.
            r#"{"intent":"refund","order_id":1.5,"tags":[],"urgent":true}"#,
            r#"{"intent":"refund","order_id":"1","tags":[],"urgent":true}"#,
            r#"{"intent":"refund","order_id":01,"tags":[],"urgent":true}"#,
            r#"{"intent":"refund","order_id":1,"tags":[3],"urgent":true}"#,
            r#"{"intent":"refund","order_id":1,"tags":[],"urgent":yes}"#,
            // Trailing text after the object.
            r#"{"intent":"refund","order_id":1,"tags":[],"urgent":true} ok"#,
            "[]",
        ] {
            assert!(!accepts(&r, bad), "{bad}");
        }
        // A prefix is not complete, but may go on.
        let mut m = Matcher::new(r.clone());
        assert!(m.feed(br#"{"intent":"re"#));
        assert!(!m.is_complete());
        assert!(m.allows(b"fund\""));
        assert!(!m.allows(b"turn\""));
    }

    #[test]
    fn output_is_compact_whitespace_only_inside_strings() {
        let r = router();
        // The form OpenAI returns is admitted (above); the padded forms a
        // model drifts into are not, wherever the padding sits.
        for padded in [
            r#"{"intent": "refund","order_id":1,"tags":[],"urgent":true}"#,
            "{\n\"intent\":\"refund\",\"order_id\":1,\"tags\":[],\"urgent\":true}",
            r#"{"intent":"refund" ,"order_id":1,"tags":[],"urgent":true}"#,
            r#"{"intent":"refund","order_id":1,"tags":[ ],"urgent":true}"#,
            r#"{"intent":"refund","order_id":1,"tags":[],"urgent":true }"#,
            r#" {"intent":"refund","order_id":1,"tags":[],"urgent":true}"#,
        ] {
            assert!(!accepts(&r, padded), "{padded:?}");
        }
        let any = Node::json_object();
        assert!(accepts(&any, r#"{"a b":"c d\te"}"#));
        assert!(!accepts(&any, r#"{"a": 1}"#));
        assert!(!accepts(&any, "{\"a\":1}\n"));
    }

    #[test]
    fn forced_bytes_are_those_the_schema_leaves_no_choice_over() {
        let r = router();
        let mut m = Matcher::new(r.clone());
        // The opening brace, the first key and the string's quote.
        assert_eq!(m.forced(), br#"{"intent":""#);
        assert!(m.feed(br#"{"intent":"#));
        assert_eq!(m.forced(), b"\"");
        assert!(m.feed(b"\""));
        // Three intents: the model chooses.
        assert_eq!(m.forced(), b"");
        // "t" can only be track_order; the rest of it and the next key follow.
        assert!(m.feed(b"t"));
        assert_eq!(m.forced(), br#"rack_order","order_id":"#);
        assert!(m.feed(br#"rack_order","order_id":12"#));
        // Digits, a comma: a choice.
        assert_eq!(m.forced(), b"");
        assert!(m.feed(b","));
        assert_eq!(m.forced(), br#""tags":["#);
        assert!(m.feed(br#""tags":[],"urgent":"#));
        assert_eq!(m.forced(), b"");
        assert!(m.feed(b"f"));
        assert_eq!(m.forced(), b"alse}");
        assert!(m.feed(b"alse}"));
        assert!(m.is_complete());
        assert_eq!(m.forced(), b"");
        // Nothing is forced inside a free string, or in a free object
        // beyond its brace.
        let mut any = Matcher::new(Node::json_object());
        assert_eq!(any.forced(), b"{");
        assert!(any.feed(b"{"));
        assert_eq!(any.forced(), b"");
        // An enum whose values share a first byte of a character stops
        // inside it: the caller decides what to do with a partial one.
        let accents = Node::from_schema(&json!({
            "type": "object", "properties": {"w": {"enum": ["caf\u{e9}", "caf\u{e8}"]}}
        }))
        .unwrap();
        let m = Matcher::new(accents);
        assert_eq!(m.forced(), b"{\"w\":\"caf\xc3");
    }

    #[test]
    fn a_list_of_types_admits_each_and_nothing_else() {
        let r = Node::from_schema(&json!({
            "type": "object",
            "properties": {"order_id": {"type": ["string", "null"]}, "n": {"type": ["integer", "boolean"]}}
        }))
        .unwrap();
        // (Properties come in the order serde_json keeps them: by name.)
        assert!(accepts(&r, r#"{"n":3,"order_id":null}"#));
        assert!(accepts(&r, r#"{"n":true,"order_id":"12"}"#));
        for bad in [
            r#"{"n":3,"order_id":12}"#,
            r#"{"n":3,"order_id":nul}"#,
            r#"{"n":"3","order_id":null}"#,
            r#"{"n":3.5,"order_id":null}"#,
        ] {
            assert!(!accepts(&r, bad), "{bad}");
        }
    }

    #[test]
    fn unsupported_keywords_are_named_not_ignored() {
        let e = Node::from_schema(&json!({
            "type": "object",
            "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}}
        }))
        .unwrap_err();
        assert!(e.contains("`pattern`") && e.contains("schema.code"), "{e}");
        let e = Node::from_schema(&json!({"type": "string"})).unwrap_err();
        assert!(e.contains("root must be an object"), "{e}");
        assert!(Node::from_schema(&json!({"anyOf": []})).is_err());
        let e = Node::from_schema(&json!({
            "type": "object", "properties": {"n": {"type": ["integer", "number"]}}
        }))
        .unwrap_err();
        assert!(e.contains("lists `number` twice"), "{e}");
        assert!(
            Node::from_schema(&json!({"type": "object", "properties": {"a": {"enum": []}}}))
                .is_err()
        );
    }

    #[test]
    fn masking_keeps_the_best_allowed_token_and_ends_only_when_complete() {
        let r = Node::from_schema(&json!({
            "type": "object",
            "properties": {"intent": {"enum": ["refund", "track_order"]}}
        }))
        .unwrap();
        // A toy vocabulary: 0 is the end of the turn.
        let vocab: Vec<Option<Box<[u8]>>> = vec![
            None,
            Some(b"{\"".to_vec().into()),
            Some(b"intent\":".to_vec().into()),
            Some(b"\"ref".to_vec().into()),
            Some(b"\"delivery\"".to_vec().into()),
            Some(b"und\"}".to_vec().into()),
            Some(b"hello".to_vec().into()),
        ];
        let mut m = Matcher::new(r);
        let mut out = Vec::new();
        for _ in 0..6 {
            // The invented intent and plain text score highest throughout.
            let mut logits = vec![0.0, 1.0, 1.0, 1.0, 9.0, 1.0, 8.0];
            mask(&mut logits, &m, &vocab, &[0], 1);
            let best = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap();
            assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 1);
            if best == 0 {
                break;
            }
            assert!(m.feed(vocab[best].as_deref().unwrap()));
            out.extend_from_slice(vocab[best].as_deref().unwrap());
        }
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"intent":"refund"}"#);
        assert!(m.is_complete());
    }
}
