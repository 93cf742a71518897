//! Human-written durations: `"500ms"`, `"10s"`, `"5m"`, `"1h"`, `"1d"`, and
//! compounds from the largest unit down such as `"1m30s"` or `"1h30m"`.

use std::time::Duration;

/// Units from the largest to the smallest, with their length in milliseconds.
/// `ms` must be tried before `m` when matching a suffix.
const UNITS: [(&str, u64); 5] = [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

fn invalid(s: &str) -> String {
    format!("invalid duration \"{s}\": write a number followed by ms, s, m, h or d (e.g. \"10s\")")
}

/// Parses a duration such as `"10s"`.
///
/// A duration is one or more `<integer><unit>` parts with units `d`, `h`,
/// `m`, `s` or `ms`, each unit at most once and from the largest to the
/// smallest (`"1h30m"`, not `"30m1h"`). The error text explains the accepted
/// forms so it can be shown to the user as is.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut rest = s;
    let mut total_ms: u64 = 0;
    // Index into UNITS of the smallest unit seen so far; the next part must
    // use a strictly smaller unit.
    let mut next_allowed_unit = 0;
    if rest.is_empty() {
        return Err(invalid(s));
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(invalid(s));
        }
        let (number, after_number) = rest.split_at(digits);
        let unit_len = after_number.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after_unit) = after_number.split_at(unit_len);
        let Some(unit_index) = UNITS.iter().position(|&(name, _)| name == unit) else {
            return Err(invalid(s));
        };
        if unit_index < next_allowed_unit {
            return Err(format!(
                "invalid duration \"{s}\": write each unit once, from the largest to the smallest (e.g. \"1h30m\", \"1m30s\")"
            ));
        }
        next_allowed_unit = unit_index + 1;
        let too_large = || format!("duration \"{s}\" is too large");
        let value: u64 = number.parse().map_err(|_| too_large())?;
        let part_ms = value.checked_mul(UNITS[unit_index].1).ok_or_else(too_large)?;
        total_ms = total_ms.checked_add(part_ms).ok_or_else(too_large)?;
        rest = after_unit;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Formats a duration in the form [`parse_duration`] accepts, using the
/// largest units that fit (`90s` → `"1m30s"`). Sub-millisecond parts are
/// dropped, since configuration durations are whole milliseconds.
pub fn format_duration(duration: Duration) -> String {
    let mut remaining_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if remaining_ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (name, unit_ms) in UNITS {
        let count = remaining_ms / unit_ms;
        if count > 0 {
            out.push_str(&count.to_string());
            out.push_str(name);
            remaining_ms -= count * unit_ms;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
    }

    #[test]
    fn parses_compounds_from_largest_unit_down() {
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h2m3s4ms"), Ok(Duration::from_millis(3_723_004)));
        assert_eq!(parse_duration("1d1ms"), Ok(Duration::from_millis(86_400_001)));
        let err = parse_duration("30s1m").unwrap_err();
        assert!(err.contains("from the largest to the smallest"), "{err}");
        assert!(parse_duration("1s1s").is_err());
    }

    #[test]
    fn rejects_junk_with_a_helpful_message() {
        for junk in [
            "", "10", "s", "10x", "10 s", " 10s", "10s ", "-1s", "1.5s", "10sec", "ms", "1us", "1S", "1m30", "1e3ms",
        ] {
            let err = parse_duration(junk).expect_err(junk);
            assert!(err.contains("ms, s, m, h or d") || err.contains("largest to the smallest"), "{junk:?}: {err}");
        }
        assert_eq!(
            parse_duration("10x").unwrap_err(),
            "invalid duration \"10x\": write a number followed by ms, s, m, h or d (e.g. \"10s\")"
        );
    }

    #[test]
    fn rejects_overflow() {
        let err = parse_duration("99999999999999999999d").unwrap_err();
        assert!(err.contains("too large"), "{err}");
        let err = parse_duration("999999999999999999d").unwrap_err();
        assert!(err.contains("too large"), "{err}");
    }

    #[test]
    fn format_round_trips() {
        for ms in [0u64, 1, 999, 1_000, 1_500, 60_000, 90_000, 3_600_000, 3_723_004, 86_400_000, 90_061_001] {
            let duration = Duration::from_millis(ms);
            let text = format_duration(duration);
            assert_eq!(parse_duration(&text), Ok(duration), "{text}");
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
    }

    #[test]
    fn text_round_trips() {
        for text in ["10s", "1m30s", "1d2h3m4s5ms", "500ms", "5m", "1h"] {
            let duration = parse_duration(text).unwrap();
            assert_eq!(format_duration(duration), text);
        }
    }
}
