//! What makes an answer right: checks on the generated text. Every check in
//! an item's list must pass.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Check {
    /// The answer, trimmed, equals `value`.
    Exact { value: String },
    /// Case-insensitive substring.
    Contains { value: String },
    /// Case-insensitive substring, any one of `values`.
    ContainsAny { values: Vec<String> },
    /// Case-insensitive substring that must be absent.
    NotContains { value: String },
    /// A regular expression (Rust `regex` syntax) found anywhere.
    Regex { pattern: String },
    /// The answer, trimmed, parses as JSON.
    Json,
    /// The answer is a JSON object whose `fields` equal these values
    /// (fields not listed are not checked).
    JsonFields {
        fields: serde_json::Map<String, Value>,
    },
    /// The answer is JSON valid against `schema` (a JSON Schema subset:
    /// type, enum, const, properties, required, additionalProperties, items,
    /// minItems, maxItems, minLength, maxLength, pattern, minimum, maximum).
    JsonSchema { schema: Value },
}

#[derive(Debug, thiserror::Error)]
#[error("check {index}: {why}")]
pub struct CheckError {
    pub index: usize,
    pub why: String,
}

impl Check {
    /// Refuses what could never be evaluated (a regex that does not compile).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Regex { pattern } => regex::Regex::new(pattern)
                .map(|_| ())
                .map_err(|e| format!("bad regex {pattern:?}: {e}")),
            Self::JsonSchema { schema } if !schema.is_object() && !schema.is_boolean() => {
                Err("a JSON schema must be an object".into())
            }
            _ => Ok(()),
        }
    }

    pub fn passes(&self, answer: &str) -> bool {
        let lower = || answer.to_lowercase();
        match self {
            Self::Exact { value } => answer.trim() == value,
            Self::Contains { value } => lower().contains(&value.to_lowercase()),
            Self::ContainsAny { values } => {
                let a = lower();
                values.iter().any(|v| a.contains(&v.to_lowercase()))
            }
            Self::NotContains { value } => !lower().contains(&value.to_lowercase()),
            Self::Regex { pattern } => {
                regex::Regex::new(pattern).is_ok_and(|re| re.is_match(answer))
            }
            Self::Json => serde_json::from_str::<Value>(answer.trim()).is_ok(),
            Self::JsonFields { fields } => match serde_json::from_str::<Value>(answer.trim()) {
                Ok(Value::Object(obj)) => fields.iter().all(|(k, v)| obj.get(k) == Some(v)),
                _ => false,
            },
            Self::JsonSchema { schema } => serde_json::from_str::<Value>(answer.trim())
                .is_ok_and(|v| schema_accepts(schema, &v)),
        }
    }
}

/// Whether `v` satisfies `schema` (the subset named on [`Check::JsonSchema`]).
pub fn schema_accepts(schema: &Value, v: &Value) -> bool {
    let Some(s) = schema.as_object() else {
        return schema.as_bool().unwrap_or(false);
    };
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let is = |t: &str| match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            "integer" => v.as_f64().is_some_and(|n| n.fract() == 0.0),
            "number" => v.is_number(),
            _ => false,
        };
        if !types.iter().any(|t| is(t)) {
            return false;
        }
    }
    if let Some(options) = s.get("enum").and_then(Value::as_array)
        && !options.contains(v)
    {
        return false;
    }
    if let Some(c) = s.get("const")
        && c != v
    {
        return false;
    }
    if let Some(text) = v.as_str() {
        let n = text.chars().count() as u64;
        if s.get("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| n < m)
            || s.get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| n > m)
        {
            return false;
        }
        if let Some(p) = s.get("pattern").and_then(Value::as_str)
            && !regex::Regex::new(p).is_ok_and(|re| re.is_match(text))
        {
            return false;
        }
    }
    if let Some(n) = v.as_f64()
        && (s
            .get("minimum")
            .and_then(Value::as_f64)
            .is_some_and(|m| n < m)
            || s.get("maximum")
                .and_then(Value::as_f64)
                .is_some_and(|m| n > m))
    {
        return false;
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if s.get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| n < m)
            || s.get("maxItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| n > m)
        {
            return false;
        }
        if let Some(item_schema) = s.get("items")
            && !items.iter().all(|i| schema_accepts(item_schema, i))
        {
            return false;
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(required) = s.get("required").and_then(Value::as_array)
            && !required
                .iter()
                .filter_map(Value::as_str)
                .all(|k| obj.contains_key(k))
        {
            return false;
        }
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(sub) if !schema_accepts(sub, val) => return false,
                Some(_) => {}
                None => {
                    if let Some(extra) = s.get("additionalProperties")
                        && !schema_accepts(extra, val)
                    {
                        return false;
                    }
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: Value) -> Check {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn text_checks() {
        assert!(check(json!({"type": "exact", "value": "yes"})).passes(" yes\n"));
        assert!(!check(json!({"type": "exact", "value": "yes"})).passes("Yes"));
        assert!(check(json!({"type": "contains", "value": "paris"})).passes("It is Paris."));
        assert!(
            check(json!({"type": "contains_any", "values": ["Bard", "Shakespeare"]}))
                .passes("William Shakespeare")
        );
        assert!(!check(json!({"type": "not_contains", "value": "{"})).passes("{\"a\": 1}"));
        assert!(check(json!({"type": "regex", "pattern": "(?i)\\b4\\b"})).passes("It is 4."));
        assert!(!check(json!({"type": "regex", "pattern": "\\b4\\b"})).passes("It is 14."));
        assert!(
            check(json!({"type": "regex", "pattern": "("}))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn json_checks() {
        let route =
            check(json!({"type": "json_fields", "fields": {"intent": "refund", "order_id": null}}));
        assert!(route.passes(" {\"intent\": \"refund\", \"order_id\": null, \"extra\": 1} "));
        assert!(!route.passes("{\"intent\": \"refund\", \"order_id\": \"12\"}"));
        assert!(!route.passes("Sure! {\"intent\": \"refund\"}"));
        assert!(check(json!({"type": "json"})).passes("[1, 2]"));
        let schema = check(json!({"type": "json_schema", "schema": {
            "type": "object", "required": ["intent", "order_id"], "additionalProperties": false,
            "properties": {
                "intent": {"type": "string", "enum": ["refund", "track_order"]},
                "order_id": {"type": ["string", "null"], "pattern": "^[0-9]+$"}
            }
        }}));
        assert!(schema.passes("{\"intent\": \"refund\", \"order_id\": \"123\"}"));
        assert!(schema.passes("{\"intent\": \"track_order\", \"order_id\": null}"));
        assert!(
            !schema.passes("{\"intent\": \"delivery_date\", \"order_id\": \"1\"}"),
            "not in the enum"
        );
        assert!(
            !schema.passes("{\"intent\": \"refund\", \"order_id\": \"12a\"}"),
            "pattern"
        );
        assert!(!schema.passes("{\"intent\": \"refund\"}"), "required");
        assert!(
            !schema.passes("{\"intent\": \"refund\", \"order_id\": null, \"x\": 1}"),
            "additional"
        );
    }
}
