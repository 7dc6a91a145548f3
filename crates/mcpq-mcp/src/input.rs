//! What mcpq answers when a server asks the client for something: as a JSON-RPC request on a
//! response stream (session eras) or as the input requests of an `InputRequiredResult`
//! (multi round-trip requests, 2026-07-28). mcpq has no user, no model and no roots, so it
//! declines elicitations, lists no roots and refuses sampling; it never invents an answer.

use serde_json::{Map, Value, json};

use crate::outcome::RpcError;

/// The most rounds one request may take when the server keeps asking for input.
pub(crate) const MAX_INPUT_ROUNDS: usize = 8;

/// mcpq's answer to a server-to-client request.
pub(crate) fn answer(method: &str) -> Result<Value, RpcError> {
    match method {
        "ping" => Ok(json!({})),
        // nobody is there to fill in a form: a refusal, so the server can go on without it
        "elicitation/create" => Ok(json!({ "action": "decline" })),
        "roots/list" => Ok(json!({ "roots": [] })),
        _ => Err(RpcError {
            code: RpcError::METHOD_NOT_FOUND,
            message: format!("mcpq does not serve {method}"),
            data: None,
        }),
    }
}

/// True when `result` asks the client for input before the request can complete; a result
/// without `resultType` is complete.
pub(crate) fn is_input_required(result: &Value) -> bool {
    result.get("resultType").and_then(Value::as_str) == Some("input_required")
}

/// The params of the retry after `result` (an `InputRequiredResult`): the original params,
/// the answers to its input requests (those mcpq cannot answer are left out) and its
/// `requestState` echoed untouched. Built from `original` every round, so nothing of one
/// request's exchange leaks into another's.
pub(crate) fn retry_params(original: &Value, result: &Value) -> Value {
    let mut params = match original {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    params.remove("inputResponses");
    params.remove("requestState");
    if let Some(Value::Object(requests)) = result.get("inputRequests") {
        let responses: Map<String, Value> = requests
            .iter()
            .filter_map(|(key, request)| {
                let method = request.get("method").and_then(Value::as_str)?;
                answer(method).ok().map(|a| (key.clone(), a))
            })
            .collect();
        params.insert("inputResponses".into(), Value::Object(responses));
    }
    if let Some(state) = result.get("requestState") {
        params.insert("requestState".into(), state.clone());
    }
    Value::Object(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_requests_get_refusals_never_invented_answers() {
        assert_eq!(answer("ping"), Ok(json!({})));
        assert_eq!(answer("elicitation/create"), Ok(json!({"action": "decline"})));
        assert_eq!(answer("roots/list"), Ok(json!({"roots": []})));
        assert_eq!(answer("sampling/createMessage").unwrap_err().code, RpcError::METHOD_NOT_FOUND);
    }

    #[test]
    fn a_retry_echoes_the_state_exactly_and_answers_what_it_can() {
        let original = json!({"name": "t", "arguments": {"a": 1}, "_meta": {"k": "v"}});
        let state = "{\"nonce\":\"n\",\"originalId\":1}";
        let result = json!({
            "resultType": "input_required",
            "inputRequests": {
                "confirm": {"method": "elicitation/create", "params": {"message": "ok?"}},
                "llm": {"method": "sampling/createMessage", "params": {}},
                "roots": {"method": "roots/list"},
            },
            "requestState": state,
        });
        assert!(is_input_required(&result));
        let retry = retry_params(&original, &result);
        assert_eq!(retry["requestState"], state);
        assert_eq!(
            retry["inputResponses"],
            json!({"confirm": {"action": "decline"}, "roots": {"roots": []}})
        );
        assert_eq!(
            (&retry["name"], &retry["arguments"], &retry["_meta"]),
            (&original["name"], &original["arguments"], &original["_meta"])
        );
    }

    #[test]
    fn no_state_in_the_result_means_none_in_the_retry() {
        let original = json!({"name": "t", "requestState": "stale", "inputResponses": {}});
        let result = json!({"resultType": "input_required", "inputRequests": {}});
        let retry = retry_params(&original, &result);
        assert!(retry.get("requestState").is_none(), "{retry}");
        assert_eq!(retry["inputResponses"], json!({}));
        let state_only = json!({"resultType": "input_required", "requestState": "s"});
        let retry = retry_params(&json!({"name": "t"}), &state_only);
        assert_eq!(retry, json!({"name": "t", "requestState": "s"}));
        assert!(!is_input_required(&json!({"content": []})));
        assert!(!is_input_required(&json!({"resultType": "complete"})));
    }
}
