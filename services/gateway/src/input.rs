//! Checks on what clients send that Postgres could never store, made before
//! anything is acknowledged: a NUL character (U+0000) is refused with a 400
//! naming the field, since neither Postgres text nor JSON can hold one (a
//! stored form with the character escaped would not be what the client
//! sent, and every reader would have to undo it). Ids are checked for shape
//! so that a strange one is simply not found, never a database error.

use serde_json::Value;

use crate::AppError;

/// The longest end-user id accepted (`user` in chats and votes, and in
/// `DELETE /v1/users/{user}/data`).
pub const MAX_USER: usize = 256;

/// The path of the first string (key or value) in `v` holding a NUL
/// character, in the `messages[0].content` style OpenAI uses for `param`.
pub fn find_nul(v: &Value) -> Option<String> {
    fn walk(v: &Value, path: &mut String) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            Value::Object(map) => map.iter().any(|(k, item)| {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&k.replace('\0', "\\u0000"));
                let found = k.contains('\0') || walk(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            _ => false,
        }
    }
    let mut path = String::new();
    walk(v, &mut path).then_some(path)
}

/// 400 when the body holds a NUL character anywhere.
pub fn refuse_nul(body: &Value) -> Result<(), AppError> {
    match find_nul(body) {
        None => Ok(()),
        Some(path) => Err(AppError::bad_request(
            format!(
                "`{}` contains a NUL character (\\u0000), which cannot be stored; remove it",
                if path.is_empty() { "body" } else { &path }
            ),
            (!path.is_empty()).then_some(path.as_str()),
        )),
    }
}

/// Whether `id` could be the id of a stored record: 1 to 128 characters,
/// none of them control characters. Anything else is not found.
pub fn plausible_id(id: &str) -> bool {
    !id.is_empty() && id.chars().count() <= 128 && !id.chars().any(char::is_control)
}

/// An end-user id from a path or a body: non-empty (an empty one would
/// address every anonymous record), at most [`MAX_USER`] characters, no NUL.
pub fn end_user(user: &str, field: &str) -> Result<(), AppError> {
    if user.is_empty() {
        return Err(AppError::bad_request(
            format!("`{field}` must not be empty"),
            Some(field),
        ));
    }
    if user.chars().count() > MAX_USER {
        return Err(AppError::bad_request(
            format!("`{field}` is longer than {MAX_USER} characters"),
            Some(field),
        ));
    }
    if user.contains('\0') {
        return Err(AppError::bad_request(
            format!("`{field}` contains a NUL character (\\u0000)"),
            Some(field),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_is_found_with_its_path() {
        assert_eq!(find_nul(&json!({"a": "ok", "b": [1, "x"]})), None);
        assert_eq!(
            find_nul(&json!({"messages": [{"role": "user", "content": "a\u{0}b"}]})).as_deref(),
            Some("messages[0].content")
        );
        assert_eq!(
            find_nul(&json!({"metadata": {"k\u{0}": "v"}})).as_deref(),
            Some("metadata.k\\u0000")
        );
        assert_eq!(find_nul(&json!("\u{0}")).as_deref(), Some(""));
    }

    #[test]
    fn ids_and_users_are_checked_for_shape() {
        assert!(plausible_id("chatcmpl-1234"));
        assert!(!plausible_id(""));
        assert!(!plausible_id("a\u{0}b"));
        assert!(!plausible_id(&"x".repeat(129)));
        assert!(end_user("ann", "user").is_ok());
        assert!(end_user("", "user").is_err());
        assert!(end_user(&"x".repeat(257), "user").is_err());
        assert!(end_user("a\u{0}", "user").is_err());
    }
}
