"""A small certificate authority for tlsgate: make a CA, issue server and client certificates, revoke, show.

X.509 in five sentences, enough to read this package:

* A *certificate* binds a public key to names (the *subject* and the *Subject Alternative Names*, SANs) and is
  signed by an *issuer*. A *CA certificate* is one whose key may sign other certificates; a *leaf* is the end
  of the chain, the thing a server or client presents.
* *Extensions* say what a certificate may be used for: ``BasicConstraints`` (is it a CA), ``KeyUsage`` (which
  key operations), ``ExtendedKeyUsage`` (``serverAuth``, ``clientAuth``). A *critical* one must be understood.
* The *Subject Key Identifier* (SKI) names a key; a certificate's *Authority Key Identifier* (AKI) repeats its
  issuer's SKI, so verifiers find the right issuer even when two CAs share a name.
* Each certificate has a *serial number* unique to its issuer; revoking it means listing the serial in a
  signed *Certificate Revocation List* (CRL) with a "next update" deadline.
* Modern TLS clients match host names against the SANs only, so every server certificate gets a DNS or IP SAN.

Read `ca` first; the other modules each do one job for it:

* `tlsgate.pki.ca` -- `CertificateAuthority` (``create``, ``load``, ``issue``, ``revoke``, ``build_crl``) and
  `Revocation`.
* `tlsgate.pki.issued` -- `IssuedCert`, a fresh leaf in memory that writes its PEM files and PKCS#12 store.
* `tlsgate.pki.names` -- checking ``--dns``/``--ip``/``--uri``/CN input, and printing names, serials, times.
* `tlsgate.pki.state` -- ``ca.json``, the CA's record of issued and revoked serials.
* `tlsgate.pki.files` -- writing files with mode 0600 or 0644, atomically, never replacing without ``force``.
* `tlsgate.pki.show` -- `describe_file`, what ``tlsgate certs show`` prints.

Reading certificates and keys (`load_certificates`, `load_private_key`, `spki_sha256`, `key_description`) is
`tlsgate.tls.x509`, shared with the TLS contexts; it is re-exported here. Data flows one way: ``cli/certs.py``
calls the CA, the CA builds certificates with ``cryptography``, records them in ``ca.json`` and hands an
`IssuedCert` back to be written. Bad input becomes a one-line `~tlsgate.errors.CertificateError` or
`~tlsgate.errors.ConfigError` that names the file, flag or value.
"""

from tlsgate.pki.ca import CA_CERT_FILE as CA_CERT_FILE
from tlsgate.pki.ca import CA_KEY_FILE as CA_KEY_FILE
from tlsgate.pki.ca import CA_STATE_FILE as CA_STATE_FILE
from tlsgate.pki.ca import DEFAULT_CA_DAYS as DEFAULT_CA_DAYS
from tlsgate.pki.ca import DEFAULT_CA_NAME as DEFAULT_CA_NAME
from tlsgate.pki.ca import DEFAULT_CRL_DAYS as DEFAULT_CRL_DAYS
from tlsgate.pki.ca import DEFAULT_LEAF_DAYS as DEFAULT_LEAF_DAYS
from tlsgate.pki.ca import REVOCATION_REASONS as REVOCATION_REASONS
from tlsgate.pki.ca import CertificateAuthority as CertificateAuthority
from tlsgate.pki.ca import Revocation as Revocation
from tlsgate.pki.files import refuse_existing as refuse_existing
from tlsgate.pki.files import write_private_file as write_private_file
from tlsgate.pki.files import write_public_file as write_public_file
from tlsgate.pki.issued import IssuedCert as IssuedCert
from tlsgate.pki.names import EKU_NAMES as EKU_NAMES
from tlsgate.pki.names import default_basename as default_basename
from tlsgate.pki.names import parse_serial as parse_serial
from tlsgate.pki.show import describe_file as describe_file
from tlsgate.tls.x509 import PrivateKey as PrivateKey
from tlsgate.tls.x509 import key_description as key_description
from tlsgate.tls.x509 import load_certificates as load_certificates
from tlsgate.tls.x509 import load_private_key as load_private_key
from tlsgate.tls.x509 import spki_sha256 as spki_sha256
