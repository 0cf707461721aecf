//! When a schedule fires: cron expressions evaluated in a time zone, or fixed intervals.

use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use virtkeep_engine::plan::ModeRequest;

#[derive(Debug, Clone)]
pub enum Trigger {
    /// Cron pattern (5 fields, or 6 with seconds first) in a time zone.
    Cron {
        cron: Box<Cron>,
        tz: Tz,
    },
    Every(Duration),
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub trigger: Trigger,
    pub mode: ModeRequest,
    /// Stable key of this schedule in the catalog: editing the schedule starts a new
    /// next-run state instead of inheriting the old one.
    pub key: String,
}

impl Schedule {
    pub fn cron(pattern: &str, tz: Tz, mode: ModeRequest) -> Result<Schedule, String> {
        let cron = croner::parser::CronParser::new()
            .parse(pattern)
            .map_err(|e| e.to_string())?;
        Ok(Schedule {
            trigger: Trigger::Cron {
                cron: Box::new(cron),
                tz,
            },
            mode,
            key: format!("cron {pattern} {tz} {}", mode.as_str()),
        })
    }

    pub fn every(every: Duration, text: &str, mode: ModeRequest) -> Schedule {
        Schedule {
            trigger: Trigger::Every(every),
            mode,
            key: format!("every {text} {}", mode.as_str()),
        }
    }

    /// The first time strictly after `after` at which the schedule fires.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.trigger {
            Trigger::Cron { cron, tz } => cron
                .find_next_occurrence(&after.with_timezone(tz), false)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
            Trigger::Every(d) => chrono::Duration::from_std(*d).ok().map(|d| after + d),
        }
    }

    /// Where a schedule without catalog state starts: an interval fires at once (a new
    /// policy gets its first backup without waiting a whole interval), a cron
    /// expression at its next occurrence.
    pub fn first_run(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.trigger {
            Trigger::Every(_) => Some(now),
            Trigger::Cron { .. } => self.next_after(now),
        }
    }

    pub fn describe(&self) -> String {
        match &self.trigger {
            Trigger::Cron { cron, tz } => format!("cron \"{}\" ({tz})", cron.pattern),
            Trigger::Every(d) => format!("every {}", format_duration(*d)),
        }
    }
}

/// `90s`, `15m`, `6h`, `1d`, or combinations such as `1h30m`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut any = false;
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
        any = true;
    }
    if !num.is_empty() || !any {
        return None;
    }
    Some(Duration::from_secs(total))
}

pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s > 0 && s % 86400 == 0 => format!("{}d", s / 86400),
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Some(Duration::from_secs(172800)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
    }

    #[test]
    fn cron_in_a_time_zone_follows_daylight_saving() {
        let tz: Tz = "Europe/Berlin".parse().expect("tz");
        let s = Schedule::cron("0 2 * * *", tz, ModeRequest::Incremental).expect("cron");
        // Winter: 02:00 in Berlin is 01:00 UTC.
        let t = Utc
            .with_ymd_and_hms(2026, 1, 10, 12, 0, 0)
            .single()
            .expect("t");
        assert_eq!(
            s.next_after(t),
            Utc.with_ymd_and_hms(2026, 1, 11, 1, 0, 0).single()
        );
        // Summer: 00:00 UTC.
        let t = Utc
            .with_ymd_and_hms(2026, 7, 10, 12, 0, 0)
            .single()
            .expect("t");
        assert_eq!(
            s.next_after(t),
            Utc.with_ymd_and_hms(2026, 7, 11, 0, 0, 0).single()
        );
    }

    #[test]
    fn cron_with_seconds_and_intervals() {
        let s = Schedule::cron("*/5 * * * * *", Tz::UTC, ModeRequest::Auto).expect("cron");
        let t = Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 1)
            .single()
            .expect("t");
        assert_eq!(
            s.next_after(t),
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 5).single()
        );
        let e = Schedule::every(Duration::from_secs(3), "3s", ModeRequest::Full);
        assert_eq!(e.first_run(t), Some(t));
        assert_eq!(
            e.next_after(t),
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 4).single()
        );
        assert!(Schedule::cron("61 * * * *", Tz::UTC, ModeRequest::Auto).is_err());
    }
}
