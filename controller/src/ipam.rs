//! IP addresses for machines, without I/O: the pool of the configured
//! `virtualMachineCIDRs`, and the choice of an address for a
//! VirtualMachineIPAddress given the leases that exist.
//!
//! An address is handed out by creating the cluster-wide lease named after
//! it (`ip-10-66-10-7`). The API server refuses a second object of the same
//! name, so two claims (or two controllers) can never both get one address:
//! the one whose create fails chooses again without it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::api::network::IpAddressRef;

/// Why an address cannot be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// A configured CIDR does not parse.
    #[error("{0:?} is not an IPv4 CIDR like 10.66.10.0/24")]
    InvalidCidr(String),
    /// Two configured CIDRs overlap.
    #[error("the CIDRs {0} and {1} overlap")]
    Overlap(String, String),
    /// No CIDR is configured.
    #[error("no virtualMachineCIDRs are configured")]
    NoCidrs,
    /// A static address is not an IPv4 address.
    #[error("staticIP {0:?} is not an IPv4 address")]
    InvalidAddress(String),
    /// A static address is outside every CIDR (or is a network or
    /// broadcast address).
    #[error("staticIP {0} is not a usable address of the virtualMachineCIDRs ({1})")]
    OutsidePool(Ipv4Addr, String),
    /// A static address is leased to another claim.
    #[error("{0} is already leased to VirtualMachineIPAddress {1}")]
    Taken(Ipv4Addr, String),
    /// Every address is leased.
    #[error("every address of the virtualMachineCIDRs ({0}) is leased")]
    Exhausted(String),
}

/// One CIDR: its first address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    network: u32,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, IpamError> {
        let invalid = || IpamError::InvalidCidr(text.to_string());
        let (address, prefix) = text.trim().split_once('/').ok_or_else(invalid)?;
        let address: Ipv4Addr = address.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        if prefix > 32 {
            return Err(invalid());
        }
        let mask = Self::mask(prefix);
        let network = u32::from(address) & mask;
        if network != u32::from(address) {
            // 10.66.10.5/24 is a host address, not a network: almost always a typo.
            return Err(invalid());
        }
        Ok(Cidr { network, prefix })
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    fn last(&self) -> u32 {
        self.network | !Self::mask(self.prefix)
    }

    /// Usable addresses: all but the network and broadcast addresses, except
    /// in /31 and /32, which have none to spare (RFC 3021).
    fn usable(&self) -> (u32, u32) {
        if self.prefix >= 31 {
            (self.network, self.last())
        } else {
            (self.network + 1, self.last() - 1)
        }
    }

    fn overlaps(&self, other: &Cidr) -> bool {
        self.network <= other.last() && other.network <= self.last()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

/// The addresses machines may get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPool {
    cidrs: Vec<Cidr>,
}

impl AddressPool {
    /// The pool of `cidrs` (`10.66.10.0/24`, ...), which must not overlap.
    pub fn parse<S: AsRef<str>>(cidrs: &[S]) -> Result<AddressPool, IpamError> {
        let cidrs: Vec<Cidr> = cidrs
            .iter()
            .map(|text| Cidr::parse(text.as_ref()))
            .collect::<Result<_, _>>()?;
        if cidrs.is_empty() {
            return Err(IpamError::NoCidrs);
        }
        for (index, cidr) in cidrs.iter().enumerate() {
            if let Some(other) = cidrs[index + 1..].iter().find(|other| cidr.overlaps(other)) {
                return Err(IpamError::Overlap(cidr.to_string(), other.to_string()));
            }
        }
        Ok(AddressPool { cidrs })
    }

    fn describe(&self) -> String {
        self.cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether `address` may be handed out.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        let address = u32::from(address);
        self.cidrs.iter().any(|cidr| {
            let (first, last) = cidr.usable();
            (first..=last).contains(&address)
        })
    }

    /// The first usable address not in `leased`.
    fn first_free(&self, leased: &BTreeMap<Ipv4Addr, Option<IpAddressRef>>) -> Option<Ipv4Addr> {
        for cidr in &self.cidrs {
            let (first, last) = cidr.usable();
            // The leased addresses of this range in order: the first gap is free.
            let mut candidate = u64::from(first);
            for (taken, _) in leased.range(Ipv4Addr::from(first)..=Ipv4Addr::from(last)) {
                let taken = u64::from(u32::from(*taken));
                if taken > candidate {
                    break;
                }
                candidate = taken + 1;
            }
            if candidate <= u64::from(last) {
                return u32::try_from(candidate).ok().map(Ipv4Addr::from);
            }
        }
        None
    }
}

/// The name of the lease of `address`.
pub fn lease_name(address: Ipv4Addr) -> String {
    format!("ip-{}", address.to_string().replace('.', "-"))
}

/// The address a lease name stands for.
pub fn lease_address(name: &str) -> Option<Ipv4Addr> {
    name.strip_prefix("ip-")?.replace('-', ".").parse().ok()
}

/// The address decided for a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The claim already holds this lease.
    Held(Ipv4Addr),
    /// Create the lease of this address for the claim.
    Lease(Ipv4Addr),
}

/// Chooses the address of the VirtualMachineIPAddress `claim`: the lease it
/// holds, else its `static_ip` if free and in the pool, else the first free
/// address. `leases` maps every leased address to the claim holding it
/// (`None`: released, not yet reused).
pub fn choose(
    pool: &AddressPool,
    claim: &IpAddressRef,
    static_ip: Option<&str>,
    leases: &BTreeMap<Ipv4Addr, Option<IpAddressRef>>,
) -> Result<Choice, IpamError> {
    let requested = static_ip
        .map(|text| {
            text.trim()
                .parse::<Ipv4Addr>()
                .map_err(|_| IpamError::InvalidAddress(text.to_string()))
        })
        .transpose()?;
    let held = leases
        .iter()
        .find(|(address, holder)| holder.as_ref() == Some(claim) && requested.is_none_or(|ip| ip == **address));
    if let Some((address, _)) = held {
        return Ok(Choice::Held(*address));
    }
    match requested {
        Some(address) => {
            if !pool.contains(address) {
                return Err(IpamError::OutsidePool(address, pool.describe()));
            }
            match leases.get(&address) {
                Some(Some(holder)) => Err(IpamError::Taken(address, format!("{}/{}", holder.namespace, holder.name))),
                // Released leases are bound again by the I/O layer.
                Some(None) | None => Ok(Choice::Lease(address)),
            }
        }
        None => pool
            .first_free(leases)
            .map(Choice::Lease)
            .ok_or_else(|| IpamError::Exhausted(pool.describe())),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The claim `name` in namespace `vms`.
    pub(crate) fn claim(name: &str) -> IpAddressRef {
        IpAddressRef {
            name: name.into(),
            namespace: "vms".into(),
        }
    }

    /// An address from text.
    pub(crate) fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    #[test]
    fn pools_parse_and_refuse_what_is_wrong() {
        assert!(AddressPool::parse(&["10.66.10.0/24", "10.66.20.0/30"]).is_ok());
        for bad in ["10.66.10.0", "10.66.10.0/33", "10.66.10.5/24", "fd00::/64", "x/8"] {
            assert_eq!(AddressPool::parse(&[bad]), Err(IpamError::InvalidCidr(bad.into())), "{bad}");
        }
        assert_eq!(
            AddressPool::parse(&["10.0.0.0/8", "10.66.0.0/16"]),
            Err(IpamError::Overlap("10.0.0.0/8".into(), "10.66.0.0/16".into()))
        );
        assert_eq!(AddressPool::parse::<&str>(&[]), Err(IpamError::NoCidrs));
    }

    #[test]
    fn network_and_broadcast_addresses_are_never_handed_out() {
        let pool = AddressPool::parse(&["10.66.10.0/30"]).unwrap_or_else(|error| panic!("{error}"));
        assert!(!pool.contains(ip("10.66.10.0")));
        assert!(pool.contains(ip("10.66.10.1")) && pool.contains(ip("10.66.10.2")));
        assert!(!pool.contains(ip("10.66.10.3")));
        let point_to_point =
            AddressPool::parse(&["10.0.0.0/31", "10.0.1.7/32"]).unwrap_or_else(|error| panic!("{error}"));
        assert!(point_to_point.contains(ip("10.0.0.0")) && point_to_point.contains(ip("10.0.0.1")));
        assert!(point_to_point.contains(ip("10.0.1.7")));
    }

    #[test]
    fn addresses_are_never_handed_out_twice_and_the_pool_runs_out_plainly() {
        let pool = AddressPool::parse(&["10.66.10.0/29", "10.66.20.0/31"]).unwrap_or_else(|error| panic!("{error}"));
        let mut leases = BTreeMap::new();
        let mut given = Vec::new();
        // 6 usable in the /29, 2 in the /31.
        for index in 0..8 {
            let name = format!("vm-{index}");
            match choose(&pool, &claim(&name), None, &leases) {
                Ok(Choice::Lease(address)) => {
                    assert!(!leases.contains_key(&address));
                    leases.insert(address, Some(claim(&name)));
                    given.push(address);
                }
                other => panic!("claim {index}: {other:?}"),
            }
        }
        assert_eq!(given[0], ip("10.66.10.1"));
        assert_eq!(given[5], ip("10.66.10.6"));
        assert_eq!(given[6..], [ip("10.66.20.0"), ip("10.66.20.1")]);
        assert_eq!(
            choose(&pool, &claim("late"), None, &leases),
            Err(IpamError::Exhausted("10.66.10.0/29, 10.66.20.0/31".into()))
        );
        // A claim that holds a lease keeps it.
        assert_eq!(choose(&pool, &claim("vm-3"), None, &leases), Ok(Choice::Held(given[3])));
        // A gap left by a deleted lease is the next one handed out.
        leases.remove(&given[2]);
        assert_eq!(choose(&pool, &claim("late"), None, &leases), Ok(Choice::Lease(given[2])));
    }

    #[test]
    fn static_addresses_must_be_in_the_pool_and_free() {
        let pool = AddressPool::parse(&["10.66.10.0/24"]).unwrap_or_else(|error| panic!("{error}"));
        let mut leases = BTreeMap::new();
        assert_eq!(
            choose(&pool, &claim("a"), Some("10.66.10.50"), &leases),
            Ok(Choice::Lease(ip("10.66.10.50")))
        );
        leases.insert(ip("10.66.10.50"), Some(claim("a")));
        assert_eq!(
            choose(&pool, &claim("b"), Some("10.66.10.50"), &leases),
            Err(IpamError::Taken(ip("10.66.10.50"), "vms/a".into()))
        );
        assert_eq!(choose(&pool, &claim("a"), Some("10.66.10.50"), &leases), Ok(Choice::Held(ip("10.66.10.50"))));
        assert_eq!(
            choose(&pool, &claim("b"), Some("10.66.11.1"), &leases),
            Err(IpamError::OutsidePool(ip("10.66.11.1"), "10.66.10.0/24".into()))
        );
        assert_eq!(
            choose(&pool, &claim("b"), Some("10.66.10.255"), &leases),
            Err(IpamError::OutsidePool(ip("10.66.10.255"), "10.66.10.0/24".into()))
        );
        assert_eq!(
            choose(&pool, &claim("b"), Some("ten"), &leases),
            Err(IpamError::InvalidAddress("ten".into()))
        );
        leases.insert(ip("10.66.10.60"), None);
        assert_eq!(
            choose(&pool, &claim("b"), Some("10.66.10.60"), &leases),
            Ok(Choice::Lease(ip("10.66.10.60"))),
            "a released lease can be taken again"
        );
    }

    #[test]
    fn lease_names_stand_for_their_address() {
        assert_eq!(lease_name(ip("10.66.10.7")), "ip-10-66-10-7");
        assert_eq!(lease_address("ip-10-66-10-7"), Some(ip("10.66.10.7")));
        assert_eq!(lease_address("other"), None);
        assert_eq!(lease_address("ip-10-66-10"), None);
    }
}
