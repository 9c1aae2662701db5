//! W3C trace context (`traceparent`, `tracestate`) as the writer of an event left it, checked
//! before it becomes two headers of the event's record.
//!
//! Invariant: a record carries a `traceparent` header only when its value is well formed per
//! W3C Trace Context level 1 (version `00` exactly, a later version by its first 55 characters),
//! and a `tracestate` header only beside such a `traceparent`. A malformed value is never an
//! error that stops the pipeline: [`TraceContext::check`] drops it and says why, and the caller
//! warns and counts.

/// Header carrying the W3C trace parent.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Header carrying the W3C trace state.
pub const TRACESTATE_HEADER: &str = "tracestate";

/// Most bytes of a `tracestate` value (W3C: 512 characters; a longer one may be truncated by
/// whoever propagates it, so walship drops it rather than pass on something others would cut).
const TRACESTATE_MAX: usize = 512;
/// Most list members of a `tracestate` value.
const TRACESTATE_MEMBERS: usize = 32;

/// A checked trace context: the values as written, borrowed from the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext<'a> {
    /// `traceparent`, well formed.
    pub traceparent: &'a [u8],
    /// `tracestate`, well formed, when the writer gave one.
    pub tracestate: Option<&'a [u8]>,
}

/// Why (part of) a trace context was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceProblem {
    /// The `traceparent` is malformed (and any `tracestate` goes with it).
    Traceparent(&'static str),
    /// The `tracestate` is malformed; the `traceparent` is kept.
    Tracestate(&'static str),
}

impl std::fmt::Display for TraceProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TraceProblem::Traceparent(why) => write!(f, "traceparent dropped: {why}"),
            TraceProblem::Tracestate(why) => write!(f, "tracestate dropped: {why}"),
        }
    }
}

impl<'a> TraceContext<'a> {
    /// Checks what a row or message carries: the context to put on the record (if any), and
    /// what was dropped (if anything). Absent values (NULL, `""`) are no context, not a problem.
    pub fn check(
        traceparent: Option<&'a [u8]>,
        tracestate: Option<&'a [u8]>,
    ) -> (Option<TraceContext<'a>>, Option<TraceProblem>) {
        let tracestate = tracestate.filter(|s| !s.is_empty());
        let Some(traceparent) = traceparent.filter(|p| !p.is_empty()) else {
            let problem = tracestate
                .map(|_| TraceProblem::Tracestate("there is no traceparent it belongs to"));
            return (None, problem);
        };
        if let Err(why) = check_traceparent(traceparent) {
            return (None, Some(TraceProblem::Traceparent(why)));
        }
        match tracestate.map(check_tracestate) {
            Some(Err(why)) => (
                Some(TraceContext {
                    traceparent,
                    tracestate: None,
                }),
                Some(TraceProblem::Tracestate(why)),
            ),
            _ => (
                Some(TraceContext {
                    traceparent,
                    tracestate,
                }),
                None,
            ),
        }
    }
}

fn is_lower_hex(b: &[u8]) -> bool {
    b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// `version-traceid-parentid-flags`: `00-<32 hex>-<16 hex>-<2 hex>`, lower-case, ids not all zero.
fn check_traceparent(v: &[u8]) -> Result<(), &'static str> {
    if v.len() < 55 {
        return Err("shorter than version-traceid-parentid-flags (55 characters)");
    }
    let (version, trace_id, parent_id, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return Err("not version-traceid-parentid-flags separated by '-'");
    }
    if ![version, trace_id, parent_id, flags]
        .iter()
        .all(|part| is_lower_hex(part))
    {
        return Err("a field is not lower-case hex");
    }
    if version == b"ff" {
        return Err("version ff is invalid");
    }
    if version == b"00" && v.len() != 55 {
        return Err("version 00 is exactly 55 characters");
    }
    if v.len() > 55 && v[55] != b'-' {
        return Err("a later version's extra fields must follow a '-'");
    }
    if trace_id.iter().all(|&c| c == b'0') {
        return Err("the trace id is all zeros");
    }
    if parent_id.iter().all(|&c| c == b'0') {
        return Err("the parent id is all zeros");
    }
    Ok(())
}

/// A comma-separated list of at most 32 `key=value` members (empty members allowed), printable
/// ASCII, at most 512 bytes.
fn check_tracestate(v: &[u8]) -> Result<(), &'static str> {
    if v.len() > TRACESTATE_MAX {
        return Err("longer than 512 characters");
    }
    if !v.iter().all(|c| (0x20..=0x7e).contains(c) || *c == b'\t') {
        return Err("not printable ASCII");
    }
    let mut members = 0;
    for member in v.split(|&c| c == b',') {
        let member = member.trim_ascii();
        if member.is_empty() {
            continue;
        }
        members += 1;
        let Some(eq) = member.iter().position(|&c| c == b'=') else {
            return Err("a list member is not key=value");
        };
        let (key, value) = (&member[..eq], &member[eq + 1..]);
        let key_ok = !key.is_empty()
            && key.len() <= 256
            && key.iter().all(|&c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || matches!(c, b'_' | b'-' | b'*' | b'/' | b'@')
            });
        if !key_ok {
            return Err("a list member's key is not a lower-case key");
        }
        if value.is_empty() || value.len() > 256 || value.contains(&b'=') {
            return Err("a list member's value is empty, too long or holds '='");
        }
    }
    if members > TRACESTATE_MEMBERS {
        return Err("more than 32 list members");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_well_formed_context_is_kept_as_written() {
        let (ctx, problem) =
            TraceContext::check(Some(GOOD), Some(b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
        assert_eq!(problem, None);
        let ctx = ctx.expect("kept");
        assert_eq!(ctx.traceparent, GOOD);
        assert_eq!(
            ctx.tracestate,
            Some(&b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"[..])
        );
        // A later version: the first 55 characters in the known format, then '-' and more.
        let later = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert!(TraceContext::check(Some(later), None).0.is_some());
        assert_eq!(
            TraceContext::check(None, None),
            (None, None),
            "no context, no problem"
        );
        assert_eq!(TraceContext::check(Some(b""), None), (None, None));
    }

    #[test]
    fn a_malformed_traceparent_is_dropped_with_its_tracestate() {
        for bad in [
            &b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0"[..],
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            b"not a traceparent at all, but long enough to be looked at",
        ] {
            let (ctx, problem) = TraceContext::check(Some(bad), Some(b"a=b"));
            assert_eq!(ctx, None, "{}", String::from_utf8_lossy(bad));
            assert!(matches!(problem, Some(TraceProblem::Traceparent(_))));
        }
    }

    #[test]
    fn a_malformed_tracestate_is_dropped_alone() {
        let long = vec![b'a'; 600];
        let many = (0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        for bad in [
            &b"novalue"[..],
            b"K=v",
            b"a=b=c",
            b"a=\xff",
            &long,
            many.as_bytes(),
        ] {
            let (ctx, problem) = TraceContext::check(Some(GOOD), Some(bad));
            assert_eq!(
                ctx,
                Some(TraceContext {
                    traceparent: GOOD,
                    tracestate: None
                }),
                "{}",
                String::from_utf8_lossy(bad)
            );
            assert!(matches!(problem, Some(TraceProblem::Tracestate(_))));
        }
        let (ctx, problem) = TraceContext::check(None, Some(b"a=b"));
        assert_eq!(ctx, None);
        assert!(matches!(problem, Some(TraceProblem::Tracestate(_))));
    }
}
