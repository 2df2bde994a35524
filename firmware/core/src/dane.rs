//! Matching a server's certificate chain against TLSA records (RFC 6698 §2.1, RFC 7671 §5,
//! RFC 7672 §3.1): the selected part of a certificate (all of it, or its SubjectPublicKeyInfo),
//! then the matching type (the bytes, SHA-256 or SHA-512) compared with the record's data. No
//! I/O; the DANE-TA chain check (that the leaf chains to the matched certificate and is valid for
//! the host name) is the runtime's, with the candidates found here.

use ring::digest;
use sealgate_proto::dane::{
    DANE_EE, DANE_TA, MATCH_FULL, MATCH_SHA256, MATCH_SHA512, SELECTOR_CERT, SELECTOR_SPKI, Tlsa,
};

/// The part of `cert` (DER) that `selector` names; `None` for an unknown selector or a
/// certificate whose SPKI cannot be found.
pub fn select(selector: u8, cert: &[u8]) -> Option<&[u8]> {
    match selector {
        SELECTOR_CERT => Some(cert),
        SELECTOR_SPKI => crate::x509::spki_of(cert),
        _ => None,
    }
}

/// Whether `record` matches `cert` (DER), whatever its usage.
pub fn matches(record: &Tlsa, cert: &[u8]) -> bool {
    let Some(selected) = select(record.selector, cert) else {
        return false;
    };
    let alg = match record.matching {
        MATCH_FULL => return selected == record.data.as_slice(),
        MATCH_SHA256 => &digest::SHA256,
        MATCH_SHA512 => &digest::SHA512,
        _ => return false,
    };
    // Digests are public data here: no constant-time comparison needed.
    digest::digest(alg, selected).as_ref() == record.data.as_slice()
}

/// The first usable DANE-EE record that matches the leaf (`chain[0]`). RFC 7672 §3.1.1: no
/// name check and no validity dates for DANE-EE.
pub fn ee_match<'a>(records: &'a [Tlsa], chain: &[&[u8]]) -> Option<&'a Tlsa> {
    let leaf = chain.first()?;
    records
        .iter()
        .filter(|r| r.usage == DANE_EE && r.usable())
        .find(|r| matches(r, leaf))
}

/// A trust anchor candidate for DANE-TA: a certificate of the chain a record matched, or the
/// record's own certificate (`2 0 0`, which needs not be in the chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaCandidate<'a> {
    pub record: &'a Tlsa,
    /// The anchor certificate (DER).
    pub cert: Vec<u8>,
    /// Its position in the chain; `None` for a `2 0 0` record's certificate.
    pub index: Option<usize>,
}

/// The DANE-TA candidates, chain order first (RFC 7671 §5.2.2: the anchor may be any
/// certificate the server sent, the leaf included, e.g. a self-signed one).
pub fn ta_candidates<'a>(records: &'a [Tlsa], chain: &[&[u8]]) -> Vec<TaCandidate<'a>> {
    let ta: Vec<&Tlsa> = records
        .iter()
        .filter(|r| r.usage == DANE_TA && r.usable())
        .collect();
    let mut out = Vec::new();
    for (i, cert) in chain.iter().enumerate() {
        if let Some(r) = ta.iter().find(|r| matches(r, cert)) {
            out.push(TaCandidate {
                record: r,
                cert: cert.to_vec(),
                index: Some(i),
            });
        }
    }
    for r in ta {
        let in_chain = out.iter().any(|c| c.cert == r.data);
        if r.selector == SELECTOR_CERT && r.matching == MATCH_FULL && !in_chain {
            out.push(TaCandidate {
                record: r,
                cert: r.data.clone(),
                index: None,
            });
        }
    }
    out
}

/// Why nothing matched, for logs: the leaf's SHA-256 of the certificate and of its SPKI.
pub fn describe_leaf(chain: &[&[u8]]) -> String {
    let Some(leaf) = chain.first() else {
        return "no certificate".into();
    };
    let spki = select(SELECTOR_SPKI, leaf)
        .map(crate::x509::sha256_hex)
        .unwrap_or_else(|| "unparsable".into());
    format!(
        "the leaf's SHA-256 is {}, its SPKI's {spki}",
        crate::x509::sha256_hex(leaf)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(name: &str) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
        let c = params.self_signed(&key).expect("cert");
        let der = c.der().to_vec();
        let spki = crate::x509::spki_of(&der).expect("spki").to_vec();
        (der, spki)
    }

    fn rec(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> Tlsa {
        Tlsa {
            usage,
            selector,
            matching,
            data,
        }
    }

    fn sha256(b: &[u8]) -> Vec<u8> {
        digest::digest(&digest::SHA256, b).as_ref().to_vec()
    }

    fn sha512(b: &[u8]) -> Vec<u8> {
        digest::digest(&digest::SHA512, b).as_ref().to_vec()
    }

    #[test]
    fn every_selector_and_matching_type() {
        let (der, spki) = cert("mx.test");
        let (other, other_spki) = cert("mx.test");
        let table = [
            (rec(3, 0, 0, der.clone()), true),
            (rec(3, 0, 1, sha256(&der)), true),
            (rec(3, 0, 2, sha512(&der)), true),
            (rec(3, 1, 0, spki.clone()), true),
            (rec(3, 1, 1, sha256(&spki)), true),
            (rec(3, 1, 2, sha512(&spki)), true),
            (rec(3, 0, 1, sha256(&other)), false),
            (rec(3, 1, 1, sha256(&other_spki)), false),
            (rec(3, 1, 1, sha256(&der)), false), // the certificate's digest under selector 1
            (rec(3, 1, 3, sha256(&spki)), false), // unknown matching type
            (rec(3, 2, 1, sha256(&spki)), false), // unknown selector
        ];
        for (r, want) in table {
            assert_eq!(matches(&r, &der), want, "{}", r.describe());
        }
        assert!(!matches(&rec(3, 1, 1, sha256(&spki)), b"not a certificate"));
    }

    #[test]
    fn ee_needs_the_leaf_and_a_usable_ee_record() {
        let (leaf, leaf_spki) = cert("mx.test");
        let (ca, _) = cert("ca.test");
        let chain = [leaf.as_slice(), ca.as_slice()];
        let ee = rec(3, 1, 1, sha256(&leaf_spki));
        let pkix_ee = rec(1, 1, 1, sha256(&leaf_spki));
        let of_ca = rec(3, 0, 1, sha256(&ca));
        assert_eq!(ee_match(std::slice::from_ref(&ee), &chain), Some(&ee));
        assert_eq!(ee_match(&[pkix_ee, of_ca], &chain), None);
        assert_eq!(ee_match(std::slice::from_ref(&ee), &[]), None);
        assert!(describe_leaf(&chain).contains(&crate::hex::encode(&sha256(&leaf_spki))));
    }

    #[test]
    fn ta_candidates_in_chain_order_and_from_full_records() {
        let (leaf, _) = cert("mx.test");
        let (ca, ca_spki) = cert("ca.test");
        let (outside, _) = cert("root.test");
        let chain = [leaf.as_slice(), ca.as_slice()];
        let by_spki = rec(2, 1, 1, sha256(&ca_spki));
        let full = rec(2, 0, 0, outside.clone());
        let ee_of_ca = rec(3, 1, 1, sha256(&ca_spki)); // not a TA record
        let records = [ee_of_ca, by_spki.clone(), full.clone()];
        let c = ta_candidates(&records, &chain);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(
            (c[0].record, c[0].index, &c[0].cert),
            (&by_spki, Some(1), &ca)
        );
        assert_eq!(
            (c[1].record, c[1].index, &c[1].cert),
            (&full, None, &outside)
        );
        // a 2 0 0 record of a certificate in the chain is found once, in place
        let in_chain = rec(2, 0, 0, ca.clone());
        let c = ta_candidates(std::slice::from_ref(&in_chain), &chain);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].index, Some(1));
    }
}
