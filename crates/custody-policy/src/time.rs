//! Calendar arithmetic for the `time` and `session` parts of the input document.
//!
//! PostgreSQL hands us timestamps as microseconds since the Unix epoch; policies
//! want RFC 3339 text, an hour and a weekday. A whole date library (chrono) for
//! three fields is not worth its weight on the statement path, so this is
//! Howard Hinnant's `civil_from_days`, which is exact for the proleptic Gregorian
//! calendar over the whole `i64` day range we can be handed.

use std::fmt::Write;

const US_PER_SECOND: i64 = 1_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

/// Lower-case English day names, Monday first (ISO 8601 order).
pub const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// One instant broken down in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub micros: u32,
    /// 0 = Monday .. 6 = Sunday.
    pub weekday: u32,
}

/// (year, month 1-12, day 1-31) of the day `days` after 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift the epoch to 0000-03-01 so that the leap day is the last day of
    // the (March-based) year, then split into 400-year eras.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Breaks a Unix timestamp in microseconds down in UTC.
pub fn civil_from_unix_us(unix_us: i64) -> Civil {
    let secs = unix_us.div_euclid(US_PER_SECOND);
    let micros = unix_us.rem_euclid(US_PER_SECOND) as u32;
    let days = secs.div_euclid(SECONDS_PER_DAY);
    let sod = secs.rem_euclid(SECONDS_PER_DAY) as u32;
    let (year, month, day) = civil_from_days(days);
    Civil {
        year,
        month,
        day,
        hour: sod / 3600,
        minute: sod / 60 % 60,
        second: sod % 60,
        micros,
        // 1970-01-01 was a Thursday (index 3).
        weekday: (days + 3).rem_euclid(7) as u32,
    }
}

/// Whole seconds since the epoch, rounded towards minus infinity.
pub fn unix_seconds(unix_us: i64) -> i64 {
    unix_us.div_euclid(US_PER_SECOND)
}

/// RFC 3339 in UTC with microseconds, e.g. `2026-11-28T14:00:00.123456Z`.
/// Always six fractional digits so the text sorts like the instant.
pub fn rfc3339_from_unix_us(unix_us: i64) -> String {
    let c = civil_from_unix_us(unix_us);
    let mut out = String::with_capacity(27);
    // Years outside 0000-9999 are not RFC 3339; PostgreSQL allows them, so
    // write them anyway (with a sign) rather than fail a statement over it.
    if (0..=9999).contains(&c.year) {
        let _ = write!(out, "{:04}", c.year);
    } else {
        let _ = write!(out, "{:+05}", c.year);
    }
    let _ = write!(
        out,
        "-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        c.month, c.day, c.hour, c.minute, c.second, c.micros
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: i64 = 1_000_000;

    #[test]
    fn epoch_is_a_thursday_at_midnight() {
        assert_eq!(rfc3339_from_unix_us(0), "1970-01-01T00:00:00.000000Z");
        let c = civil_from_unix_us(0);
        assert_eq!(WEEKDAYS[c.weekday as usize], "thursday");
        assert_eq!(c.hour, 0);
    }

    #[test]
    fn known_instants() {
        // 2026-11-28T14:00:00.123456Z (date -u -d @1795874400)
        let t = 1_795_874_400 * US + 123_456;
        assert_eq!(rfc3339_from_unix_us(t), "2026-11-28T14:00:00.123456Z");
        let c = civil_from_unix_us(t);
        assert_eq!((c.hour, WEEKDAYS[c.weekday as usize]), (14, "saturday"));
        assert_eq!(unix_seconds(t), 1_795_874_400);

        // 2000-01-01T00:00:00Z was a Saturday.
        let c = civil_from_unix_us(946_684_800 * US);
        assert_eq!((c.year, c.month, c.day), (2000, 1, 1));
        assert_eq!(WEEKDAYS[c.weekday as usize], "saturday");

        // 2038-01-19T03:14:07Z, the 32-bit limit, a Tuesday.
        let t = 2_147_483_647 * US;
        assert_eq!(rfc3339_from_unix_us(t), "2038-01-19T03:14:07.000000Z");
        assert_eq!(WEEKDAYS[civil_from_unix_us(t).weekday as usize], "tuesday");
    }

    #[test]
    fn leap_years() {
        // 2024-02-29T23:59:59.999999Z, then the next microsecond is March 1st.
        let t = 1_709_251_199 * US + 999_999;
        assert_eq!(rfc3339_from_unix_us(t), "2024-02-29T23:59:59.999999Z");
        assert_eq!(WEEKDAYS[civil_from_unix_us(t).weekday as usize], "thursday");
        assert_eq!(rfc3339_from_unix_us(t + 1), "2024-03-01T00:00:00.000000Z");
        // 2000 is a leap year (divisible by 400), 2100 is not (by 100).
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(47_540), (2100, 2, 28));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
    }

    #[test]
    fn before_the_epoch_rounds_down() {
        // One microsecond before the epoch is the last microsecond of 1969,
        // a Wednesday, and its whole second is -1 (not 0).
        assert_eq!(rfc3339_from_unix_us(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(unix_seconds(-1), -1);
        assert_eq!(
            WEEKDAYS[civil_from_unix_us(-1).weekday as usize],
            "wednesday"
        );
        assert_eq!(civil_from_days(-719_468), (0, 3, 1));
    }

    #[test]
    fn every_day_round_trips_through_a_simple_count() {
        // Walk 1960..2110 day by day, checking against a naive calendar.
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let (mut y, mut m, mut d) = (1960i64, 1u32, 1u32);
        let start = -3653; // 1960-01-01
        for days in start..start + 150 * 366 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            let len = match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > len {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }
}
