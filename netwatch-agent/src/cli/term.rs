//! Fitting output to the terminal: its width, shortened pod names,
//! truncated cells and wrapped prose. On-call reads netwatch in an
//! 80-column `kubectl exec` more often than on a wide screen, and a line
//! that wraps breaks `top`'s redraw.

use std::io::IsTerminal;

/// Columns to fit: the terminal's when standard output is one, else
/// `COLUMNS` when set, else 80.
pub fn terminal_width() -> usize {
    if std::io::stdout().is_terminal()
        && let Some(w) = tty_columns()
    {
        return w;
    }
    width_from(std::env::var("COLUMNS").ok().as_deref())
}

/// `COLUMNS` if it is a sensible number, else 80.
pub fn width_from(columns: Option<&str>) -> usize {
    columns
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|w| *w >= 20)
        .unwrap_or(80)
}

fn tty_columns() -> Option<usize> {
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we own.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col >= 20).then_some(usize::from(ws.ws_col))
}

/// Columns `s` takes: one per character (netwatch prints no wide glyphs),
/// none for colour escape sequences.
pub fn width(s: &str) -> usize {
    let mut n = 0;
    let mut in_escape = false;
    for c in s.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, _) => n += 1,
        }
    }
    n
}

/// `s` cut to `max` columns, ending in `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if width(s) <= max {
        return s.to_string();
    }
    if max == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// A pod name in at most `max` columns, keeping what tells pods apart.
///
/// Pods of a Deployment are named `<deployment>-<pod-template-hash>-<5
/// random>`: the hash is the same for every replica, so it goes first
/// (`web-…-q8z2m`); then the workload name is cut, keeping the replica's own
/// suffix (`very-long-na…-q8z2m`).
pub fn shorten_pod(name: &str, max: usize) -> String {
    if width(name) <= max {
        return name.to_string();
    }
    let parts: Vec<&str> = name.rsplitn(3, '-').collect();
    if let [suffix, hash, prefix] = parts[..]
        && (5..=10).contains(&hash.len())
        && hash.chars().all(|c| c.is_ascii_alphanumeric())
    {
        let short = format!("{prefix}-…-{suffix}");
        if width(&short) <= max {
            return short;
        }
        let keep = max.saturating_sub(width(suffix) + 2);
        if keep >= 1 {
            let head: String = prefix.chars().take(keep).collect();
            return format!("{head}…-{suffix}");
        }
        if width(suffix) < max {
            return format!("…{suffix}");
        }
    } else if let Some((prefix, suffix)) = name.rsplit_once('-')
        && width(suffix) + 4 <= max
    {
        // StatefulSet and other `name-N` pods: keep the ordinal.
        let keep = max - width(suffix) - 2;
        let head: String = prefix.chars().take(keep).collect();
        return format!("{head}…-{suffix}");
    }
    truncate(name, max)
}

/// `namespace/pod` with the pod shortened to fit `max` columns overall.
pub fn shorten_endpoint(name: &str, max: usize) -> String {
    if width(name) <= max {
        return name.to_string();
    }
    match name.split_once('/') {
        // The namespace gets at most half: the pod is what differs.
        Some((ns, pod)) if max >= 8 => {
            let ns = truncate(ns, width(ns).min(max / 2));
            let pod = shorten_pod(pod, max - width(&ns) - 1);
            format!("{ns}/{pod}")
        }
        _ => truncate(name, max),
    }
}

/// Wrap each line of `text` at `width` columns on spaces; continuation
/// lines keep the line's indentation plus two spaces. Words longer than a
/// line are left whole rather than split.
pub fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if self::width(line) <= width {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let cont = " ".repeat((indent + 2).min(width / 2));
        let mut cur = line[..indent].to_string();
        let mut at_start = true;
        for word in line.trim_start().split(' ') {
            let need = self::width(word) + usize::from(!at_start);
            if !at_start && self::width(&cur) + need > width {
                out.push_str(cur.trim_end());
                out.push('\n');
                cur = cont.clone();
                at_start = true;
            }
            if !at_start {
                cur.push(' ');
            }
            cur.push_str(word);
            at_start = false;
        }
        out.push_str(cur.trim_end());
        out.push('\n');
    }
    if !text.ends_with('\n') {
        out.pop();
    }
    out
}

/// Column widths that fit `total` columns (with one space between columns):
/// start from `want` and take from the column furthest above its `min`
/// until they fit (or every column is at its minimum).
pub fn fit_widths(want: &[usize], min: &[usize], total: usize) -> Vec<usize> {
    let mut w = want.to_vec();
    let gaps = w.len().saturating_sub(1);
    while w.iter().sum::<usize>() + gaps > total {
        let Some((i, _)) = w
            .iter()
            .zip(min)
            .enumerate()
            .filter(|(_, (c, m))| c > m)
            .max_by_key(|(_, (c, m))| *c - *m)
        else {
            break;
        };
        w[i] -= 1;
    }
    w
}

/// One row of cells padded (left-aligned, or right-aligned where `right`)
/// and cut to `widths`; the last cell is not padded.
pub fn row(cells: &[&str], widths: &[usize], right: &[bool]) -> String {
    let mut line = String::new();
    for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
        let c = truncate(c, *w);
        let pad = w.saturating_sub(width(&c));
        if i > 0 {
            line.push(' ');
        }
        if right.get(i).copied().unwrap_or(false) {
            line.push_str(&" ".repeat(pad));
            line.push_str(&c);
        } else {
            line.push_str(&c);
            if i + 1 < cells.len() {
                line.push_str(&" ".repeat(pad));
            }
        }
    }
    line.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn width_comes_from_columns_else_80() {
        assert_eq!(width_from(None), 80);
        assert_eq!(width_from(Some("132")), 132);
        assert_eq!(width_from(Some("junk")), 80);
    }

    #[test]
    fn pod_names_keep_what_tells_replicas_apart() {
        assert_eq!(shorten_pod("web-7f9c4-q8z2m", 40), "web-7f9c4-q8z2m");
        assert_eq!(shorten_pod("web-7f9c4c8d9b-q8z2m", 14), "web-…-q8z2m");
        let s = shorten_pod("payments-processor-canary-7f9c4c8d9b-q8z2m", 20);
        assert!(s.ends_with("…-q8z2m") && width(&s) <= 20, "{s}");
        assert_eq!(
            shorten_pod("postgres-primary-replica-12", 16),
            "postgres-pri…-12"
        );
        assert_eq!(
            shorten_endpoint("prod/web-7f9c4c8d9b-q8z2m", 16),
            "prod/web-…-q8z2m"
        );
        assert!(width(&shorten_pod("x".repeat(50).as_str(), 10)) <= 10);
    }

    #[test]
    fn wrap_keeps_indentation_and_width() {
        let text = "  ingress: prod/default-deny-all isolates prod/api-5d4e8-h7t3c; no policy allows prod/web-7f9c4-q8z2m on 8080/TCP";
        let w = wrap(text, 40);
        assert!(w.lines().all(|l| width(l) <= 40), "{w}");
        assert!(w.lines().skip(1).all(|l| l.starts_with("    ")), "{w}");
        assert_eq!(
            w.split_whitespace().collect::<Vec<_>>(),
            text.split_whitespace().collect::<Vec<_>>()
        );
    }

    #[test]
    fn widths_shrink_the_widest_columns_first() {
        let w = fit_widths(&[12, 30, 34, 8], &[12, 10, 10, 4], 60);
        assert_eq!(w.iter().sum::<usize>() + 3, 60);
        assert_eq!(w[0], 12);
        let line = row(
            &[
                "a",
                "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
                "c",
                "1",
            ],
            &w,
            &[false, false, false, true],
        );
        assert!(width(&line) <= 60, "{line}");
    }
}
