//! Secret references in `hooklog.toml`: `env:NAME` or `file:PATH`, never an
//! inline value. Shared by ingest (source signing secrets) and the processor
//! (the bearer keys of its APIs). Errors name the reference, never the value.

/// Resolves one reference to its value (trailing newlines trimmed).
pub fn resolve(reference: &str) -> Result<String, String> {
    let value = if let Some(name) = reference.strip_prefix("env:") {
        std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?
    } else if let Some(path) = reference.strip_prefix("file:") {
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read secret file {path}: {}", e.kind()))?
    } else {
        // Never echo the value: it may be an inline secret pasted by mistake.
        return Err(
            "must be a reference, env:NAME or file:PATH (inline secrets are not allowed)".into(),
        );
    };
    let value = value.trim_end_matches(['\r', '\n']).to_owned();
    if value.is_empty() {
        return Err("resolves to an empty secret".into());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[test]
    fn resolves_env_and_refuses_inline_values_without_echoing_them() {
        std::env::set_var("HOOKLOG_SECRET_REF_UNIT", "v4lue\n");
        assert_eq!(resolve("env:HOOKLOG_SECRET_REF_UNIT").unwrap(), "v4lue");
        let err = resolve("sk_live_inline").unwrap_err();
        assert!(!err.contains("sk_live_inline"), "{err}");
        assert!(resolve("env:HOOKLOG_SECRET_REF_MISSING")
            .unwrap_err()
            .contains("HOOKLOG_SECRET_REF_MISSING"));
    }
}
