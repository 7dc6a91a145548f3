//! HTTP request metadata of the 2026-07-28 era (SEP-2243): header-safe encoding of `Mcp-Name`
//! and `Mcp-Param-*` values, and the `x-mcp-header` annotations of a tool's `inputSchema` —
//! validated (a tool with a bad one is unusable) and mirrored from call arguments. Schemas are
//! walked as data: no `$ref` is ever followed, least of all one naming a network URI.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Map, Value};

const SENTINEL_START: &str = "=?base64?";
const SENTINEL_END: &str = "?=";

/// `value` as a header value: as is when it is plain visible ASCII (spaces inside allowed),
/// else the UTF-8 bytes in the `=?base64?…?=` sentinel form.
pub(crate) fn encode_value(value: &str) -> HeaderValue {
    let sentinel = value.starts_with(SENTINEL_START) && value.ends_with(SENTINEL_END);
    let plain = value.bytes().all(|b| (0x20..=0x7e).contains(&b))
        && !value.starts_with(' ')
        && !value.ends_with(' ')
        && !sentinel;
    let text = if plain {
        value.to_owned()
    } else {
        format!("{SENTINEL_START}{}{SENTINEL_END}", STANDARD.encode(value))
    };
    // both forms are visible ASCII and spaces only, which a header value always accepts
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `x-mcp-header` annotations of one tool: where each mirrored parameter sits in the
/// arguments, and the header it goes to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ParamHeaders(Vec<(Vec<String>, HeaderName)>);

impl ParamHeaders {
    /// The annotations of `tool` (a `tools/list` entry), or why the tool must be rejected.
    pub(crate) fn of_tool(tool: &Value) -> Result<Self, String> {
        let Some(schema) = tool.get("inputSchema") else { return Ok(Self::default()) };
        let mut found = Vec::new();
        walk(schema, Some(&mut Vec::new()), &mut found)?;
        let mut headers: Vec<(Vec<String>, HeaderName)> = Vec::new();
        for (path, name, property) in found {
            let at = path.join(".");
            if name.is_empty() {
                return Err(format!("x-mcp-header of {at:?} is empty"));
            }
            if !name.bytes().all(is_tchar) {
                return Err(format!("x-mcp-header {name:?} of {at:?} is not an HTTP token"));
            }
            if !is_primitive(property.get("type")) {
                return Err(format!(
                    "x-mcp-header {name:?} of {at:?} is on a type other than string, integer \
                     or boolean"
                ));
            }
            let header = HeaderName::from_bytes(format!("mcp-param-{name}").as_bytes())
                .map_err(|_| format!("x-mcp-header {name:?} of {at:?} is not an HTTP token"))?;
            // header names are lowercase, so this compares case-insensitively
            if headers.iter().any(|(_, h)| *h == header) {
                return Err(format!("x-mcp-header {name:?} is used twice"));
            }
            headers.push((path, header));
        }
        Ok(Self(headers))
    }

    /// The `Mcp-Param-*` headers for `arguments`; a parameter that is absent or null has none.
    pub(crate) fn for_arguments(&self, arguments: &Value) -> Vec<(HeaderName, HeaderValue)> {
        self.0
            .iter()
            .filter_map(|(path, header)| {
                let value = path.iter().try_fold(arguments, |v, key| v.get(key))?;
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Bool(b) => b.to_string(),
                    Value::Number(n) => n.to_string(),
                    Value::Null | Value::Array(_) | Value::Object(_) => return None,
                };
                Some((header.clone(), encode_value(&text)))
            })
            .collect()
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_primitive(ty: Option<&Value>) -> bool {
    let ok = |t: &str| matches!(t, "string" | "integer" | "boolean");
    match ty {
        Some(Value::String(t)) => ok(t),
        // a nullable primitive: null values are simply not mirrored
        Some(Value::Array(ts)) => {
            let named: Vec<_> = ts.iter().filter_map(Value::as_str).collect();
            named.len() == ts.len()
                && named.iter().any(|t| ok(t))
                && named.iter().all(|t| ok(t) || *t == "null")
        }
        _ => false,
    }
}

type Found<'a> = Vec<(Vec<String>, String, &'a Map<String, Value>)>;

/// Collects every `x-mcp-header` in `schema`. `path` is the chain of `properties` keys that
/// reaches `schema`, or `None` once the walk went through any other keyword: an annotation
/// there is an error.
fn walk<'a>(
    schema: &'a Value,
    path: Option<&mut Vec<String>>,
    found: &mut Found<'a>,
) -> Result<(), String> {
    let Value::Object(map) = schema else { return Ok(()) };
    let mut path = path;
    if let Some(name) = map.get("x-mcp-header") {
        let Some(name) = name.as_str() else {
            return Err("an x-mcp-header is not a string".into());
        };
        match path.as_deref() {
            Some(p) if !p.is_empty() => found.push((p.clone(), name.to_owned(), map)),
            _ => {
                return Err(format!(
                    "x-mcp-header {name:?} is not on a property reached through `properties` alone"
                ));
            }
        }
    }
    for (keyword, value) in map {
        match keyword.as_str() {
            "properties" => {
                let Value::Object(props) = value else { continue };
                for (name, sub) in props {
                    match path.as_deref_mut() {
                        Some(p) => {
                            p.push(name.clone());
                            let r = walk(sub, Some(p), found);
                            p.pop();
                            r?;
                        }
                        None => walk(sub, None, found)?,
                    }
                }
            }
            // maps of subschemas
            "patternProperties" | "dependentSchemas" | "$defs" | "definitions" => {
                if let Value::Object(subs) = value {
                    for sub in subs.values() {
                        walk(sub, None, found)?;
                    }
                }
            }
            // one subschema, or a list of them
            "items"
            | "prefixItems"
            | "additionalItems"
            | "additionalProperties"
            | "contains"
            | "propertyNames"
            | "unevaluatedItems"
            | "unevaluatedProperties"
            | "not"
            | "if"
            | "then"
            | "else"
            | "allOf"
            | "anyOf"
            | "oneOf" => match value {
                Value::Array(subs) => {
                    for sub in subs {
                        walk(sub, None, found)?;
                    }
                }
                sub => walk(sub, None, found)?,
            },
            // instance data (const, enum, default, examples) and unknown keywords hold no
            // annotations
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_that_are_not_plain_ascii_are_base64_in_a_sentinel() {
        let enc = |s: &str| encode_value(s).to_str().unwrap().to_owned();
        assert_eq!(enc("us-west1"), "us-west1");
        assert_eq!(enc("us west 1"), "us west 1");
        assert_eq!(enc(""), "");
        assert_eq!(enc("Hello, 世界"), "=?base64?SGVsbG8sIOS4lueVjA==?=");
        assert_eq!(enc(" padded "), "=?base64?IHBhZGRlZCA=?=");
        assert_eq!(enc("line1\nline2"), "=?base64?bGluZTEKbGluZTI=?=");
        assert_eq!(enc("\tindented"), "=?base64?CWluZGVudGVk?=");
        assert_eq!(enc("=?base64?literal?="), "=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?=");
    }

    fn tool(properties: Value) -> Value {
        json!({"name": "t", "inputSchema": {"type": "object", "properties": properties}})
    }

    #[test]
    fn annotated_parameters_are_mirrored_and_null_or_absent_ones_are_not() {
        let h = ParamHeaders::of_tool(&tool(json!({
            "region": {"type": "string", "x-mcp-header": "Region"},
            "priority": {"type": "integer", "x-mcp-header": "Priority"},
            "verbose": {"type": ["boolean", "null"], "x-mcp-header": "Verbose"},
            "nested": {"type": "object", "properties": {
                "zone": {"type": "string", "x-mcp-header": "Zone"}
            }},
            "query": {"type": "string"},
        })))
        .unwrap();
        let got = h.for_arguments(&json!({
            "region": "Région", "priority": 42, "verbose": null, "nested": {"zone": "z1"},
            "query": "SELECT 1",
        }));
        let mut got: Vec<_> = got.iter().map(|(k, v)| (k.as_str(), v.to_str().unwrap())).collect();
        got.sort_unstable();
        assert_eq!(
            got,
            [
                ("mcp-param-priority", "42"),
                ("mcp-param-region", "=?base64?UsOpZ2lvbg==?="),
                ("mcp-param-zone", "z1"),
            ]
        );
        let got = h.for_arguments(&json!({"region": "r", "verbose": false}));
        let verbose = got.iter().find(|(k, _)| k == "mcp-param-verbose").map(|(_, v)| v);
        assert_eq!((got.len(), verbose.map(|v| v.to_str().unwrap())), (2, Some("false")));
    }

    #[test]
    fn invalid_annotations_reject_the_tool() {
        let bad = [
            json!({"v": {"type": "string", "x-mcp-header": ""}}),
            json!({"v": {"type": "object", "x-mcp-header": "V"}}),
            json!({"v": {"type": "array", "items": {"type": "string"}, "x-mcp-header": "V"}}),
            json!({"v": {"type": "null", "x-mcp-header": "V"}}),
            json!({"v": {"type": "number", "x-mcp-header": "V"}}),
            json!({"v": {"x-mcp-header": "V"}}),
            json!({"a": {"type": "string", "x-mcp-header": "R"},
                   "b": {"type": "string", "x-mcp-header": "r"}}),
            json!({"v": {"type": "string", "x-mcp-header": "My Region"}}),
            json!({"v": {"type": "string", "x-mcp-header": "Region:Primary"}}),
            json!({"v": {"type": "string", "x-mcp-header": "Région"}}),
            json!({"v": {"type": "string", "x-mcp-header": "Region\t1"}}),
            json!({"v": {"type": "string", "x-mcp-header": 7}}),
            json!({"v": {"type": "array", "items": {"type": "string", "x-mcp-header": "V"}}}),
            json!({"v": {"anyOf": [{"type": "string", "x-mcp-header": "V"}]}}),
        ];
        for props in bad {
            assert!(ParamHeaders::of_tool(&tool(props.clone())).is_err(), "{props}");
        }
        let in_defs = json!({"name": "t", "inputSchema": {
            "$defs": {"d": {"type": "string", "x-mcp-header": "D"}}, "properties": {}
        }});
        assert!(ParamHeaders::of_tool(&in_defs).is_err());
    }

    #[test]
    fn names_and_data_that_look_like_annotations_are_not_annotations() {
        // a property called "x-mcp-header", and the keyword inside instance data
        let h = ParamHeaders::of_tool(&tool(json!({
            "x-mcp-header": {"type": "string"},
            "cfg": {"type": "object", "default": {"x-mcp-header": "nope"}},
            "id": {"$ref": "#/$defs/userId"},
            "profile": {"$ref": "http://127.0.0.1:1/never-fetched.json"},
        })))
        .unwrap();
        assert_eq!(h, ParamHeaders::default());
        assert_eq!(
            ParamHeaders::of_tool(&json!({"name": "no-schema"})),
            Ok(ParamHeaders::default())
        );
    }
}
