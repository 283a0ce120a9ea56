use core::fmt;
use core::str::FromStr;

/// A firmware version `MAJOR.MINOR.PATCH`, ordered numerically (so 1.10.0 > 1.9.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FirmwareVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

/// Why a string is not a `MAJOR.MINOR.PATCH` version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionError;

impl fmt::Display for VersionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("version must be MAJOR.MINOR.PATCH with decimal numbers")
    }
}

impl FromStr for FirmwareVersion {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, VersionError> {
        let mut parts = s.split('.');
        let mut next = || -> Result<u32, VersionError> {
            let p = parts.next().ok_or(VersionError)?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(VersionError);
            }
            p.parse().map_err(|_| VersionError)
        };
        let v = FirmwareVersion {
            major: next()?,
            minor: next()?,
            patch: next()?,
        };
        if parts.next().is_some() {
            return Err(VersionError);
        }
        Ok(v)
    }
}

impl fmt::Display for FirmwareVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_numerically_not_lexically() {
        let a: FirmwareVersion = "1.9.0".parse().unwrap();
        let b: FirmwareVersion = "1.10.0".parse().unwrap();
        assert!(b > a);
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "1.x.3",
            "-1.2.3",
            "1..3",
            "99999999999.0.0",
        ] {
            assert!(s.parse::<FirmwareVersion>().is_err(), "{s}");
        }
    }
}
