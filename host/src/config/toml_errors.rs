//! TOML errors described without the file's text, which may hold secrets.

/// A TOML syntax or type error, described without showing any of the file's text: the
/// line at fault may hold a password or a connection string with credentials. It names the
/// line, the column, the key on that line (when it is a plain key) and its table, which is
/// enough to find the mistake; string values quoted by the message are masked too.
pub(super) fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = mask_quoted_strings(err.message().trim());
    let Some(span) = err.span() else {
        return format!("{message} (the file's text is not shown: it may hold secrets)");
    };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or("");
    let line_number = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
        });
    // The table header above the line, `[name]` or `[[name]]`.
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .and_then(|header| {
            let name = header.trim_start_matches('[');
            let depth = header.len() - name.len();
            let name = name.split(']').next()?.trim();
            let plain = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '));
            plain.then(|| format!("{}{name}{}", "[".repeat(depth), "]".repeat(depth)))
        });
    let place = match (key, table) {
        (Some(key), Some(table)) => format!(", key `{key}` in {table}"),
        (Some(key), None) => format!(", key `{key}`"),
        (None, Some(table)) => format!(", in {table}"),
        (None, None) => String::new(),
    };
    format!(
        "line {line_number}, column {column}{place}: {message} (the line is not shown: it may hold secrets)"
    )
}

/// `message` with the contents of serde's quoted values (`string "…"`, `char '…'`)
/// replaced by `…`: a value given to the wrong key may be a secret.
fn mask_quoted_strings(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(found) = ["string \"", "char '"]
        .iter()
        .filter_map(|opener| rest.find(opener).map(|i| (i, *opener)))
        .min()
    {
        let (at, opener) = found;
        let quote = opener.chars().last().unwrap_or('"');
        let value_start = at + opener.len();
        out.push_str(&rest[..value_start]);
        out.push('…');
        // Debug formatting escapes quotes inside the value as `\"`.
        let mut escaped = false;
        let mut end = rest.len();
        for (i, c) in rest[value_start..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                c if c == quote => {
                    end = value_start + i;
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}
