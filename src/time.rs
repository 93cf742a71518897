//! Event-time parsing: RFC 3339 strings and epoch numbers → microseconds since the Unix epoch.
//!
//! The RFC 3339 parser is hand-written for the hot path (no allocation, no locale, no regex);
//! it is checked against chrono by a property test.

use crate::types::EventTime;
use crate::types::TimeFormat;

/// Parses `YYYY-MM-DD(T| )HH:MM:SS[.fraction](Z|z|±HH:MM)` into µs since the epoch.
pub fn parse_rfc3339_micros(s: &str) -> Option<EventTime> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let mut v: i64 = 0;
        for &c in b.get(range)? {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + (c - b'0') as i64;
        }
        Some(v)
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > i64::from(days_in_month(year, month as u32)) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        let mut scale = 100_000i64;
        while i < b.len() && b[i].is_ascii_digit() {
            micros += (b[i] - b'0') as i64 * scale;
            scale /= 10;
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset_secs = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            let off = h * 3600 + m * 60;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month as u32, day as u32);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * 1_000_000 + micros)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Days in `month` (1..=12) of `year`, proleptic Gregorian.
pub fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm). The one
/// civil-calendar conversion of the crate: time parsing, calendar windows, SQL date functions
/// and the generators use it.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    // Months counted from March, so February (and its leap day) comes last.
    let m = (i64::from(month) + 9) % 12;
    let day_of_year = (153 * m + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Inverse of [`days_from_civil`]: days since 1970-01-01 → (year, month 1..=12, day 1..=31).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let m = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * m + 2) / 5 + 1) as u32;
    let month = if m < 10 { m + 3 } else { m - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The wall clock now, in µs since the Unix epoch (0 if the clock is before 1970).
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Formats µs since the epoch as RFC 3339 UTC with microseconds (for logs and error texts).
pub fn format_micros(t: EventTime) -> String {
    match chrono::DateTime::from_timestamp_micros(t) {
        Some(dt) => dt.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        None => format!("{t}µs"),
    }
}

/// Interprets an epoch number in the given unit; `Auto` guesses the unit from the magnitude
/// (seconds before year 5138, then milliseconds, then microseconds).
pub fn epoch_number_to_micros(v: f64, format: TimeFormat) -> Option<EventTime> {
    if !v.is_finite() {
        return None;
    }
    let scale = match format {
        TimeFormat::EpochSeconds => 1e6,
        TimeFormat::EpochMillis => 1e3,
        TimeFormat::EpochMicros => 1.0,
        TimeFormat::Rfc3339 => return None,
        TimeFormat::Auto => {
            let a = v.abs();
            if a < 1e11 {
                1e6
            } else if a < 1e14 {
                1e3
            } else {
                1.0
            }
        }
    };
    let micros = (v * scale).round();
    (micros.abs() < 9.2e18).then_some(micros as i64)
}

/// Integer variant without a round trip through f64 (exact for µs and ms).
pub fn epoch_int_to_micros(v: i64, format: TimeFormat) -> Option<EventTime> {
    let mul = match format {
        TimeFormat::EpochSeconds => 1_000_000,
        TimeFormat::EpochMillis => 1_000,
        TimeFormat::EpochMicros => 1,
        TimeFormat::Rfc3339 => return None,
        TimeFormat::Auto => {
            let a = v.unsigned_abs();
            if a < 100_000_000_000 {
                1_000_000
            } else if a < 100_000_000_000_000 {
                1_000
            } else {
                1
            }
        }
    };
    v.checked_mul(mul)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The civil-date functions against a day-by-day walk of the calendar from 1600 to 2400.
    #[test]
    fn civil_calendar_matches_a_day_by_day_walk() {
        let (mut y, mut m, mut d) = (1600i64, 1u32, 1u32);
        let mut days = days_from_civil(1600, 1, 1);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        while y < 2400 {
            assert_eq!(civil_from_days(days), (y, m, d));
            assert_eq!(days_from_civil(y, m, d), days);
            days += 1;
            d += 1;
            if d > days_in_month(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }
    use proptest::prelude::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_rfc3339_micros("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_micros("1970-01-01T00:00:01.5Z"), Some(1_500_000));
        assert_eq!(parse_rfc3339_micros("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_rfc3339_micros("2026-11-23T20:00:00.123Z"), Some(1_795_464_000_123_000));
        for bad in [
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-23T20:00:00",
            "2026-11-23T20:00:00.Z",
            "2026-11-23T20:00:00Zjunk",
            "",
        ] {
            assert_eq!(parse_rfc3339_micros(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn agrees_with_chrono(secs in -2_000_000_000i64..8_000_000_000, micros in 0i64..1_000_000, off_min in -1439i32..1439) {
            let off = chrono::FixedOffset::east_opt(off_min * 60).unwrap();
            let dt = chrono::DateTime::from_timestamp(secs, (micros * 1000) as u32).unwrap().with_timezone(&off);
            let text = dt.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            prop_assert_eq!(parse_rfc3339_micros(&text), Some(secs * 1_000_000 + micros), "{}", text);
        }
    }

    #[test]
    fn epoch_numbers_by_unit() {
        assert_eq!(epoch_int_to_micros(1_700_000_000, TimeFormat::Auto), Some(1_700_000_000_000_000));
        assert_eq!(epoch_int_to_micros(1_700_000_000_000, TimeFormat::Auto), Some(1_700_000_000_000_000));
        assert_eq!(epoch_int_to_micros(1_700_000_000_000_000, TimeFormat::Auto), Some(1_700_000_000_000_000));
        assert_eq!(epoch_int_to_micros(5, TimeFormat::EpochMillis), Some(5_000));
        assert_eq!(epoch_number_to_micros(1.5, TimeFormat::EpochSeconds), Some(1_500_000));
        assert_eq!(epoch_number_to_micros(f64::NAN, TimeFormat::Auto), None);
        assert_eq!(epoch_int_to_micros(i64::MAX, TimeFormat::EpochSeconds), None);
    }
}
