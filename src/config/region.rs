//! Region names checked before they become a DNS name: a typo such as `us-east1` would
//! otherwise pass configuration and surface minutes later as a DNS failure, far from its cause.

/// AWS regions known when this was written (commercial, GovCloud, China, European Sovereign
/// Cloud, ISO). A well-formed name missing here is accepted with a warning: AWS opens regions faster
/// than releases ship.
pub(crate) const KNOWN_REGIONS: &[&str] = &[
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "af-south-1",
    "ap-east-1",
    "ap-east-2",
    "ap-south-1",
    "ap-south-2",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "ap-southeast-4",
    "ap-southeast-5",
    "ap-southeast-6",
    "ap-southeast-7",
    "ca-central-1",
    "ca-west-1",
    "eu-central-1",
    "eu-central-2",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
    "il-central-1",
    "me-central-1",
    "me-south-1",
    "mx-central-1",
    "sa-east-1",
    "us-gov-east-1",
    "us-gov-west-1",
    "cn-north-1",
    "cn-northwest-1",
    "eusc-de-east-1",
    "us-iso-east-1",
    "us-iso-west-1",
    "us-isob-east-1",
    "us-isof-south-1",
    "us-isof-east-1",
    "eu-isoe-west-1",
];

/// What a region name turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RegionCheck {
    Known,
    /// Well formed but not in [`KNOWN_REGIONS`]: maybe new, maybe a typo of `closest`.
    Unknown {
        closest: Option<&'static str>,
    },
    /// Not the shape of any region name (`us-east1`, `useast-1`, `us_east_1`).
    Malformed {
        closest: Option<&'static str>,
    },
}

/// `area(-word)+-N`, lowercase: `us-east-1`, `us-gov-west-1`, `eusc-de-east-1`.
fn well_formed(region: &str) -> bool {
    let mut parts = region.split('-');
    let Some(area) = parts.next() else {
        return false;
    };
    let rest: Vec<&str> = parts.collect();
    let Some((number, words)) = rest.split_last() else {
        return false;
    };
    let letters = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase());
    (2..=4).contains(&area.len())
        && letters(area)
        && !words.is_empty()
        && words.iter().all(|w| letters(w))
        && (1..=2).contains(&number.len())
        && number.bytes().all(|b| b.is_ascii_digit())
}

/// The known region nearest to `region` by edit distance, if it is near enough to be a typo.
pub(crate) fn closest_region(region: &str) -> Option<&'static str> {
    KNOWN_REGIONS
        .iter()
        .map(|known| (strsim::levenshtein(region, known), *known))
        .filter(|(distance, _)| *distance <= 3)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, known)| known)
}

pub(crate) fn check_region(region: &str) -> RegionCheck {
    if KNOWN_REGIONS.contains(&region) {
        RegionCheck::Known
    } else if well_formed(region) {
        RegionCheck::Unknown {
            closest: closest_region(region),
        }
    } else {
        RegionCheck::Malformed {
            closest: closest_region(region),
        }
    }
}

/// ` (did you mean X?)`, or nothing.
pub(crate) fn did_you_mean(closest: Option<&str>) -> String {
    closest
        .map(|c| format!(" (did you mean {c}?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_regions_are_well_formed() {
        for r in KNOWN_REGIONS {
            assert!(well_formed(r), "{r}");
            assert_eq!(check_region(r), RegionCheck::Known);
        }
    }

    #[test]
    fn typos_are_malformed_with_a_suggestion() {
        for (typo, meant) in [
            ("us-east1", "us-east-1"),
            ("useast-1", "us-east-1"),
            ("us_east_1", "us-east-1"),
            ("eu-west", "eu-west-1"),
            ("ap-southeast1", "ap-southeast-1"),
        ] {
            assert_eq!(
                check_region(typo),
                RegionCheck::Malformed {
                    closest: Some(meant)
                },
                "{typo}"
            );
        }
        assert_eq!(
            check_region("keyspaces"),
            RegionCheck::Malformed { closest: None }
        );
        assert!(matches!(check_region(""), RegionCheck::Malformed { .. }));
        assert!(matches!(
            check_region("us-east-1 "),
            RegionCheck::Malformed { .. }
        ));
    }

    #[test]
    fn well_formed_unknown_regions_pass_with_a_hint() {
        assert_eq!(
            check_region("us-esat-1"),
            RegionCheck::Unknown {
                closest: Some("us-east-1")
            }
        );
        assert_eq!(
            check_region("xx-newplace-9"),
            RegionCheck::Unknown { closest: None }
        );
    }
}
