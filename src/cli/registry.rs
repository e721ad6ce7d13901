//! `mailintake registry list`: what has been registered, as a readable table.

use crate::config::Config;
use crate::registry::Registry;

pub async fn list(config: &Config, limit: i64) -> anyhow::Result<()> {
    let registry = Registry::open(&config.database_url).await?;
    let rows = registry.list(limit).await?;
    registry.close().await;
    let headers = ["registered at", "mailbox", "from", "subject", "attachments"];
    let table: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.registered_at
                    .get(..19)
                    .unwrap_or(&r.registered_at)
                    .replace('T', " "),
                r.mailbox_id.clone(),
                r.from.clone().unwrap_or_default(),
                r.subject.clone().unwrap_or_default(),
                r.attachment_count.to_string(),
            ]
        })
        .collect();
    print!("{}", render_table(&headers, &table));
    println!("{} message(s)", rows.len());
    Ok(())
}

const MAX_CELL: usize = 60;

fn clip(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() > MAX_CELL {
        let mut t: String = s.chars().take(MAX_CELL - 1).collect();
        t.push('…');
        t
    } else {
        s
    }
}

/// A plain-text table with columns padded to their widest cell (counted in characters).
pub fn render_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) -> String {
    let rows: Vec<[String; N]> = rows.iter().map(|r| r.clone().map(|c| clip(&c))).collect();
    let mut widths = headers.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            if i + 1 < N {
                s.push_str(&" ".repeat(w.saturating_sub(cell.chars().count())));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    out.push_str(&line(
        widths
            .map(|w| "-".repeat(w))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::render_table;

    #[test]
    fn columns_align_with_diacritics() {
        let t = render_table(
            &["a", "subject"],
            &[["1".into(), "Žádost".into()], ["22".into(), "x".into()]],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "a   subject");
        assert_eq!(lines[2], "1   Žádost");
        assert_eq!(lines[3], "22  x");
    }
}
