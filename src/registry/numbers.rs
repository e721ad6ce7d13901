//! Registry numbers: `EP-2026-000123`. One sequence per registry (prefix) and year, advanced
//! inside the registration transaction (a row lock on PostgreSQL, the write lock on SQLite), so
//! a rolled-back registration leaves no gap and concurrent writers get no duplicates.

use sqlx::Row;

use super::RegistryError;

pub const DEFAULT_PREFIX: &str = "REG";
pub const DEFAULT_FORMAT: &str = "{prefix}-{year}-{seq:06}";

/// How numbers look. `format` may use `{prefix}`, `{year}`, `{seq}` and `{seq:0N}` (zero-padded
/// to N digits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbering {
    pub prefix: String,
    pub format: String,
}

impl Default for Numbering {
    fn default() -> Self {
        Numbering {
            prefix: DEFAULT_PREFIX.to_owned(),
            format: DEFAULT_FORMAT.to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registry number format {format:?}: {problem}")]
pub struct FormatError {
    pub format: String,
    pub problem: String,
}

impl Numbering {
    /// Checks the format once, at configuration time: known placeholders only, `{seq}` present.
    pub fn validate(&self) -> Result<(), FormatError> {
        let probe = self.render(2026, 1)?;
        if !self.format.contains("{seq") {
            return Err(FormatError {
                format: self.format.clone(),
                problem: "has no {seq} placeholder, so numbers would repeat".into(),
            });
        }
        if probe.is_empty() {
            return Err(FormatError {
                format: self.format.clone(),
                problem: "renders an empty number".into(),
            });
        }
        Ok(())
    }

    pub fn render(&self, year: i32, seq: i64) -> Result<String, FormatError> {
        let err = |problem: String| FormatError {
            format: self.format.clone(),
            problem,
        };
        let mut out = String::new();
        let mut rest = self.format.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| err("an unclosed '{'".into()))?
                + open;
            let field = &rest[open + 1..close];
            match field {
                "prefix" => out.push_str(&self.prefix),
                "year" => out.push_str(&year.to_string()),
                "seq" => out.push_str(&seq.to_string()),
                _ => {
                    let width = field
                        .strip_prefix("seq:0")
                        .and_then(|w| w.parse::<usize>().ok())
                        .filter(|w| *w <= 20)
                        .ok_or_else(|| {
                            err(format!(
                                "unknown placeholder {{{field}}} (use {{prefix}}, {{year}}, {{seq}} or {{seq:06}})"
                            ))
                        })?;
                    out.push_str(&format!("{seq:0width$}"));
                }
            }
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Takes the next number of `(registry, year)` inside `tx`.
pub(super) async fn allocate(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    registry: &str,
    year: i32,
) -> Result<i64, RegistryError> {
    let row = sqlx::query(
        "INSERT INTO registry_sequences (registry, year, last_value) VALUES ($1, $2, 1) \
         ON CONFLICT (registry, year) DO UPDATE SET last_value = registry_sequences.last_value + 1 \
         RETURNING last_value",
    )
    .bind(registry)
    .bind(i64::from(year))
    .fetch_one(&mut **tx)
    .await
    .map_err(RegistryError::db("allocate registry number"))?;
    Ok(row.get(0))
}

/// Takes `count` consecutive numbers at once (for a batch registered in one transaction) and
/// returns the last; the batch's numbers are `last - count + 1 ..= last`.
pub(super) async fn allocate_many(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    registry: &str,
    year: i32,
    count: i64,
) -> Result<i64, RegistryError> {
    let row = sqlx::query(
        "INSERT INTO registry_sequences (registry, year, last_value) VALUES ($1, $2, $3) \
         ON CONFLICT (registry, year) DO UPDATE SET last_value = registry_sequences.last_value + $3 \
         RETURNING last_value",
    )
    .bind(registry)
    .bind(i64::from(year))
    .bind(count)
    .fetch_one(&mut **tx)
    .await
    .map_err(RegistryError::db("allocate registry numbers"))?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_format() {
        let n = Numbering {
            prefix: "EP".into(),
            format: DEFAULT_FORMAT.into(),
        };
        assert_eq!(n.render(2026, 123).unwrap(), "EP-2026-000123");
        assert_eq!(n.render(2026, 1_234_567).unwrap(), "EP-2026-1234567");
        let plain = Numbering {
            prefix: "X".into(),
            format: "{year}/{seq}".into(),
        };
        assert_eq!(plain.render(2027, 5).unwrap(), "2027/5");
    }

    #[test]
    fn bad_formats_are_refused() {
        let bad = |f: &str| {
            Numbering {
                prefix: "EP".into(),
                format: f.into(),
            }
            .validate()
            .unwrap_err()
        };
        assert!(bad("{prefix}-{year}").problem.contains("no {seq}"));
        assert!(
            bad("{prefix}-{month}-{seq}")
                .problem
                .contains("unknown placeholder")
        );
        assert!(bad("{prefix-{seq}").problem.contains("unknown placeholder"));
        assert!(bad("{seq").problem.contains("unclosed"));
    }
}
