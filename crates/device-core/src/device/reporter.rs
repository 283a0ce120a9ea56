//! The reporter: what a connected device sends on its own timers (a heartbeat, and telemetry
//! from the sensors that are enabled), the platform figures and readings those carry, the
//! wall clock that stamps them, and the telemetry sequence, which never repeats across reboots.
//!
//! Inputs: [`Reporter::boot`], [`Reporter::start`] / [`Reporter::stop`] as the connection
//! comes and goes, sensor values, platform stats, the wall clock, the device's config.
//! Timers: the heartbeat and the telemetry interval ([`Reporter::next_timeout`],
//! [`Reporter::due`]). Outputs: the readings and numbers the façade publishes, and the
//! sequence reservations it must persist before a number is used.

use flotilla_proto::{DesiredConfig, SensorKind};

use super::{Config, Millis, SensorValues};

#[derive(Debug)]
pub(crate) struct Reporter {
    heartbeat_ms: u64,
    telemetry_ms: u64,
    seq_reservation: u64,
    seq: u64,
    seq_reserved_until: u64,
    enabled: [bool; 3],
    sensors: SensorValues,
    heap: u32,
    rssi: Option<i16>,
    booted_at: Millis,
    unix_offset_ms: Option<i64>,
    heartbeat_at: Option<Millis>,
    telemetry_at: Option<Millis>,
}

/// The enabled sensors' values at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Reading {
    pub pot: Option<u16>,
    pub switch: Option<bool>,
    pub temp: Option<f32>,
}

/// Which reports are due now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Due {
    pub heartbeat: bool,
    pub telemetry: bool,
}

/// A number of the telemetry sequence, and how far the reservation in NVS must reach before
/// it is used (when a new block had to be reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Numbered {
    pub seq: u64,
    pub reserve_until: Option<u64>,
}

impl Reporter {
    pub fn new(config: &Config) -> Reporter {
        Reporter {
            heartbeat_ms: config.heartbeat_ms,
            telemetry_ms: config.telemetry_ms,
            seq_reservation: config.seq_reservation.max(1),
            seq: 0,
            seq_reserved_until: 0,
            enabled: [true; 3],
            sensors: SensorValues::default(),
            heap: 0,
            rssi: None,
            booted_at: 0,
            unix_offset_ms: None,
            heartbeat_at: None,
            telemetry_at: None,
        }
    }

    /// Power-on: numbering continues above what NVS had reserved.
    pub fn boot(&mut self, now: Millis, seq_high_water: u64) {
        self.booted_at = now;
        self.seq = seq_high_water;
        self.seq_reserved_until = seq_high_water;
    }

    /// The connection is up: a heartbeat goes at once (the caller sends it), the next after
    /// one interval, telemetry after one interval.
    pub fn start(&mut self, now: Millis) {
        self.heartbeat_at = Some(now + self.heartbeat_ms);
        self.telemetry_at = Some(now + self.telemetry_ms);
    }

    /// The connection is gone: nothing is reported until the next one.
    pub fn stop(&mut self) {
        self.heartbeat_at = None;
        self.telemetry_at = None;
    }

    pub fn next_timeout(&self) -> Option<Millis> {
        self.heartbeat_at.into_iter().chain(self.telemetry_at).min()
    }

    /// The reports due at `now`, each scheduled again one interval later.
    pub fn due(&mut self, now: Millis) -> Due {
        let mut due = Due::default();
        if self.heartbeat_at.is_some_and(|t| t <= now) {
            due.heartbeat = true;
            self.heartbeat_at = Some(now + self.heartbeat_ms);
        }
        if self.telemetry_at.is_some_and(|t| t <= now) {
            due.telemetry = true;
            self.telemetry_at = Some(now + self.telemetry_ms);
        }
        due
    }

    pub fn handle_sensor_values(&mut self, values: SensorValues) {
        self.sensors = values;
    }

    pub fn handle_platform_stats(&mut self, heap: u32, rssi: Option<i16>) {
        self.heap = heap;
        self.rssi = rssi;
    }

    pub fn handle_wall_clock(&mut self, now: Millis, unix_ms: u64) {
        self.unix_offset_ms = Some(unix_ms as i64 - now as i64);
    }

    /// Wall-clock milliseconds at `now`, once the shell has told the time.
    pub fn unix_ms(&self, now: Millis) -> Option<u64> {
        self.unix_offset_ms
            .map(|off| (now as i64 + off).max(0) as u64)
    }

    pub fn heap(&self) -> u32 {
        self.heap
    }

    pub fn rssi(&self) -> Option<i16> {
        self.rssi
    }

    pub fn uptime_s(&self, now: Millis) -> u64 {
        now.saturating_sub(self.booted_at) / 1000
    }

    /// The enabled sensors' latest values; `None` when no enabled sensor has one.
    pub fn reading(&self) -> Option<Reading> {
        let [pot_on, switch_on, temp_on] = self.enabled;
        let reading = Reading {
            pot: self.sensors.pot.filter(|_| pot_on),
            switch: self.sensors.switch.filter(|_| switch_on),
            temp: self.sensors.temp.filter(|_| temp_on),
        };
        (reading.pot.is_some() || reading.switch.is_some() || reading.temp.is_some())
            .then_some(reading)
    }

    /// The next number of the sequence, which only rises, across reboots too: numbers are
    /// reserved in NVS in blocks, so flash sees one write per block, not per number.
    pub fn take_seq(&mut self) -> Numbered {
        let mut reserve_until = None;
        if self.seq >= self.seq_reserved_until {
            self.seq_reserved_until = self.seq + self.seq_reservation;
            reserve_until = Some(self.seq_reserved_until);
        }
        self.seq += 1;
        Numbered {
            seq: self.seq - 1,
            reserve_until,
        }
    }

    pub fn is_enabled(&self, sensor: SensorKind) -> bool {
        self.enabled[sensor_index(sensor)]
    }

    pub fn set_enabled(&mut self, sensor: SensorKind, on: bool) {
        self.enabled[sensor_index(sensor)] = on;
    }

    /// Applies the fields `config` sets. Intervals below one second would flood the broker:
    /// they are clamped rather than obeyed (and [`Reporter::applied`] says what was applied,
    /// so the server sees the difference). A running timer restarts on its new interval.
    pub fn apply(&mut self, now: Millis, config: &DesiredConfig) {
        for (sensor, wanted) in [
            (SensorKind::Pot, config.pot),
            (SensorKind::Switch, config.switch),
            (SensorKind::Temp, config.temp),
        ] {
            if let Some(on) = wanted {
                self.set_enabled(sensor, on);
            }
        }
        let clamp = |s: u32| u64::from(s.clamp(1, flotilla_proto::MAX_INTERVAL_S)) * 1000;
        if let Some(s) = config.telemetry_interval_s {
            self.telemetry_ms = clamp(s);
            if self.telemetry_at.is_some() {
                self.telemetry_at = Some(now + self.telemetry_ms);
            }
        }
        if let Some(s) = config.heartbeat_interval_s {
            self.heartbeat_ms = clamp(s);
            if self.heartbeat_at.is_some() {
                self.heartbeat_at = Some(now + self.heartbeat_ms);
            }
        }
    }

    /// What the reporter runs with now, every field set: its half of the reported twin.
    pub fn applied(&self) -> DesiredConfig {
        let [pot, switch, temp] = self.enabled;
        DesiredConfig {
            telemetry_interval_s: Some((self.telemetry_ms / 1000) as u32),
            heartbeat_interval_s: Some((self.heartbeat_ms / 1000) as u32),
            pot: Some(pot),
            switch: Some(switch),
            temp: Some(temp),
        }
    }
}

fn sensor_index(s: SensorKind) -> usize {
    match s {
        SensorKind::Pot => 0,
        SensorKind::Switch => 1,
        SensorKind::Temp => 2,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use alloc::vec::Vec;

    fn reporter() -> Reporter {
        Reporter::new(&Config {
            heartbeat_ms: 30_000,
            telemetry_ms: 10_000,
            seq_reservation: 4,
            ..Config::default()
        })
    }

    #[test]
    fn timers_run_only_while_connected_and_restart_on_a_new_interval() {
        let mut r = reporter();
        assert_eq!(r.next_timeout(), None);
        r.start(1_000);
        assert_eq!(r.next_timeout(), Some(11_000));
        assert_eq!(r.due(10_999), Due::default());
        assert_eq!(
            r.due(11_000),
            Due {
                heartbeat: false,
                telemetry: true
            }
        );
        assert_eq!(r.next_timeout(), Some(21_000));
        // A late wake-up reports once and schedules from now, not from the missed time.
        assert_eq!(
            r.due(95_000),
            Due {
                heartbeat: true,
                telemetry: true
            }
        );
        assert_eq!(r.next_timeout(), Some(105_000));
        r.apply(
            96_000,
            &DesiredConfig {
                telemetry_interval_s: Some(0),
                ..DesiredConfig::default()
            },
        );
        assert_eq!(r.next_timeout(), Some(97_000), "clamped to one second");
        assert_eq!(r.applied().telemetry_interval_s, Some(1));
        r.stop();
        assert_eq!(r.next_timeout(), None);
        assert_eq!(r.due(1_000_000), Due::default());
    }

    #[test]
    fn numbers_rise_across_reboots_with_one_reservation_per_block() {
        let mut r = reporter();
        r.boot(0, 0);
        let taken: Vec<Numbered> = (0..5).map(|_| r.take_seq()).collect();
        assert_eq!(
            taken.iter().map(|n| n.seq).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        let reservations: Vec<u64> = taken.iter().filter_map(|n| n.reserve_until).collect();
        assert_eq!(reservations, [4, 8]);
        // A reboot continues above the last reservation, never below a number used.
        let mut after = reporter();
        after.boot(0, 8);
        let n = after.take_seq();
        assert_eq!((n.seq, n.reserve_until), (8, Some(12)));
    }

    #[test]
    fn a_reading_holds_only_enabled_sensors_and_none_without_values() {
        let mut r = reporter();
        assert_eq!(r.reading(), None);
        r.handle_sensor_values(SensorValues {
            pot: Some(7),
            switch: Some(true),
            temp: None,
        });
        r.set_enabled(SensorKind::Pot, false);
        assert_eq!(
            r.reading(),
            Some(Reading {
                pot: None,
                switch: Some(true),
                temp: None
            })
        );
        r.set_enabled(SensorKind::Switch, false);
        assert_eq!(r.reading(), None);
        assert!(!r.is_enabled(SensorKind::Switch) && r.is_enabled(SensorKind::Temp));
    }

    #[test]
    fn the_wall_clock_stamps_from_the_offset_the_shell_gave() {
        let mut r = reporter();
        assert_eq!(r.unix_ms(5_000), None);
        r.handle_wall_clock(5_000, 1_800_000_000_000);
        assert_eq!(r.unix_ms(6_000), Some(1_800_000_001_000));
        r.boot(2_000, 0);
        assert_eq!(r.uptime_s(62_000), 60);
    }
}
