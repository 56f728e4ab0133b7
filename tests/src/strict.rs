//! Strict decoding into `k8s-openapi` types: serde ignores unknown fields,
//! the API server (with strict field validation) does not. A field that
//! does not survive a round trip through the typed struct is unknown.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Decodes `value` as `T`, refusing any field `T` does not have.
pub fn decode<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut unknown = Vec::new();
    unknown_fields(value, &back, "", &mut unknown);
    if unknown.is_empty() {
        Ok(typed)
    } else {
        let fields: Vec<String> = unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
        Err(format!("strict decoding error: {}", fields.join(", ")))
    }
}

fn unknown_fields(input: &Value, known: &Value, path: &str, out: &mut Vec<String>) {
    match (input, known) {
        (Value::Object(i), Value::Object(k)) => {
            for (key, value) in i {
                let p = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match k.get(key) {
                    Some(kv) => unknown_fields(value, kv, &p, out),
                    None if value.is_null() => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(i), Value::Array(k)) => {
            for (n, (iv, kv)) in i.iter().zip(k).enumerate() {
                unknown_fields(iv, kv, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;
    use serde_json::json;

    #[test]
    fn unknown_fields_are_refused_by_path() {
        let ok = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "a", "annotations": {"x": "y"}},
                        "spec": {"podCIDR": "10.0.0.0/24", "taints": [{"key": "k", "effect": "NoSchedule"}]}});
        assert!(decode::<Node>(&ok).is_ok());
        let mut bad = ok.clone();
        bad["spec"]["podCidr"] = json!("10.0.0.0/24");
        bad["spec"]["taints"][0]["efect"] = json!("x");
        let e = decode::<Node>(&bad).unwrap_err();
        assert!(e.contains("unknown field \"spec.podCidr\""), "{e}");
        assert!(e.contains("unknown field \"spec.taints[0].efect\""), "{e}");
    }
}
