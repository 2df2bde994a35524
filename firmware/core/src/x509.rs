//! What the gateway reads out of a peer's certificate for logs, the peer table and pins: its
//! subject for people, and the SHA-256 of the certificate and of its SubjectPublicKeyInfo.

use x509_parser::oid_registry::{
    OID_X509_COMMON_NAME, OID_X509_COUNTRY_NAME, OID_X509_LOCALITY_NAME,
    OID_X509_ORGANIZATION_NAME, OID_X509_ORGANIZATIONAL_UNIT, OID_X509_STATE_OR_PROVINCE_NAME,
};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The subject of an X.509 certificate as `CN=…, O=…` (attributes in certificate order;
/// other attribute types and non-string values are left out, control characters become `?`).
/// `None` when the DER is not a certificate.
pub fn subject_of(cert: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let labels = [
        (OID_X509_COMMON_NAME, "CN"),
        (OID_X509_COUNTRY_NAME, "C"),
        (OID_X509_LOCALITY_NAME, "L"),
        (OID_X509_STATE_OR_PROVINCE_NAME, "ST"),
        (OID_X509_ORGANIZATION_NAME, "O"),
        (OID_X509_ORGANIZATIONAL_UNIT, "OU"),
    ];
    let mut parts = Vec::new();
    for attr in cert.subject().iter_attributes() {
        let Some((_, label)) = labels.iter().find(|(oid, _)| oid == attr.attr_type()) else {
            continue;
        };
        let Ok(text) = attr.as_str() else {
            continue;
        };
        let text: String = text
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        parts.push(format!("{label}={text}"));
    }
    Some(parts.join(", "))
}

/// The DER of a certificate's SubjectPublicKeyInfo (tag and length included).
pub fn spki_of(cert: &[u8]) -> Option<&[u8]> {
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    Some(cert.tbs_certificate.subject_pki.raw)
}

/// SHA-256 of `der`, lower-case hex.
pub fn sha256_hex(der: &[u8]) -> String {
    crate::hex::encode(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_and_spki_of_generated_certificate() {
        let mut params =
            rcgen::CertificateParams::new(vec!["peer.test".to_string()]).expect("params");
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "gw-b.vpn.test");
        dn.push(rcgen::DnType::OrganizationName, "Partner\nInc");
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            subject_of(cert.der()).as_deref(),
            Some("CN=gw-b.vpn.test, O=Partner?Inc")
        );
        assert_eq!(
            spki_of(cert.der()),
            Some(rcgen::PublicKeyData::subject_public_key_info(&key).as_slice())
        );
        assert_eq!(subject_of(b"\x30\x03\x02\x01"), None);
        assert_eq!(subject_of(b""), None);
        assert_eq!(spki_of(b"\x30\x00"), None);
    }
}
