//! The record layer of an established TLS session, run by the connection
//! itself: rustls does the handshake and then hands over the traffic keys
//! (its kernel-connection API, made for callers that protect records
//! themselves), and this layer seals and opens records with ring's AEADs
//! (RFC 8446 §5 for TLS 1.3; RFC 5246 §6.2.3.3, RFC 5288 and RFC 7905 for
//! TLS 1.2).
//!
//! Why: rustls's session keeps its whole record layer, its handshake
//! joiner and its queues for the connection's life, about 2 KB beyond the
//! keys themselves. An idle connection here keeps the two directions' keys
//! and sequence numbers and, on TLS 1.3, rustls's key schedule (the traffic
//! secrets a key update derives from); nothing else.
//!
//! What it does beyond sealing and opening:
//!
//! - a TLS 1.3 `KeyUpdate` from the client switches the receiving key, and,
//!   when the client asks, the sending one before the next application
//!   data (announced by a `KeyUpdate` of ours; one for any number of
//!   requests);
//! - more than 32 records in a row without application data (key updates,
//!   ignored alerts, empty records) fail the session, as rustls does;
//! - before the sending key reaches its suite's confidentiality limit
//!   (2^24 records for AES-GCM) a TLS 1.3 session updates it; a TLS 1.2
//!   session, which cannot, ends with `close_notify` (as rustls does);
//! - `close_notify` ends the stream; TLS 1.3's `user_canceled` and TLS 1.2's
//!   warnings are ignored; any other alert from the client fails the
//!   session;
//! - whatever the protocol does not allow here (a handshake message other
//!   than `KeyUpdate`, TLS 1.2 renegotiation, a record too long, a record
//!   that does not authenticate) fails the session with the fatal alert
//!   RFC 8446 §6 names for it.

use bytes::{Buf, BufMut, BytesMut};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion, SupportedCipherSuite};
use zeroize::Zeroizing;

/// A record's header: type, legacy version, length.
const HEADER: usize = 5;
/// An AEAD tag (every suite offered has a 16-byte tag).
const TAG: usize = 16;
/// TLS 1.2 AES-GCM's explicit nonce, carried in each record.
const EXPLICIT_NONCE: usize = 8;
/// The largest plaintext fragment (RFC 8446 §5.1, RFC 5246 §6.2.1).
pub(super) const MAX_FRAGMENT: usize = 1 << 14;
/// The most a record adds to its fragment, beyond the header (TLS 1.2
/// GCM's explicit nonce and the tag; TLS 1.3's inner type and the tag).
pub(super) const RECORD_OVERHEAD: usize = HEADER + EXPLICIT_NONCE + TAG;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const KEY_UPDATE: u8 = 24;

/// Alert descriptions (RFC 8446 §6).
pub(super) mod alert {
    pub(crate) const CLOSE_NOTIFY: u8 = 0;
    pub(crate) const UNEXPECTED_MESSAGE: u8 = 10;
    pub(crate) const BAD_RECORD_MAC: u8 = 20;
    pub(crate) const RECORD_OVERFLOW: u8 = 22;
    pub(crate) const ILLEGAL_PARAMETER: u8 = 47;
    pub(crate) const DECODE_ERROR: u8 = 50;
    pub(crate) const INTERNAL_ERROR: u8 = 80;
    pub(crate) const USER_CANCELED: u8 = 90;
}

/// Why the session cannot go on, and the alert the peer is owed (none when
/// the peer's own alert ended it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub(super) struct Fatal {
    /// The alert to send before closing.
    pub(super) alert: Option<u8>,
    reason: &'static str,
}

impl Fatal {
    fn send(alert: u8, reason: &'static str) -> Self {
        Self {
            alert: Some(alert),
            reason,
        }
    }
}

/// How records are framed and their nonces and additional data made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Nonce: IV ⊕ sequence; additional data: the record header; the
    /// content type inside the encryption.
    Tls13,
    /// Nonce: 4-byte salt ‖ 8 explicit bytes sent in the record;
    /// additional data: sequence ‖ type ‖ version ‖ length.
    Tls12Gcm,
    /// Nonce: IV ⊕ sequence; additional data as for GCM.
    Tls12Chacha,
}

/// One direction's traffic key, IV and next sequence number.
///
/// The key is kept as its bytes. Expanded for ring (AES round keys and
/// GHASH tables: 544 B, whatever the algorithm) it costs about as much
/// CPU as sealing one small record, so it is expanded when a call needs
/// it and kept expanded only while the direction is busy: used in more
/// than one call since the last rest ([`RecordLayer::rest`], the
/// connection's heartbeat).
struct Keys {
    algorithm: &'static aead::Algorithm,
    secret: Zeroizing<[u8; 32]>,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    /// Calls that used the key since the last rest (saturating).
    uses: u8,
    /// This call used the key.
    touched: bool,
    expanded: Option<Box<LessSafeKey>>,
}

impl Keys {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, Fatal> {
        let unsupported = Fatal::send(alert::INTERNAL_ERROR, "unsupported cipher suite");
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(unsupported),
        };
        let mut secret = Zeroizing::new([0; 32]);
        let bytes = key.as_ref();
        if bytes.len() != algorithm.key_len() || bytes.len() > secret.len() {
            return Err(unsupported);
        }
        secret[..bytes.len()].copy_from_slice(bytes);
        Ok(Self {
            algorithm,
            secret,
            iv: iv.as_ref().try_into().map_err(|_| unsupported)?,
            seq,
            uses: 0,
            touched: false,
            expanded: None,
        })
    }

    /// The expanded key, expanding it if this call is the first to need it.
    fn key(&mut self) -> Result<&LessSafeKey, Fatal> {
        self.touched = true;
        if self.expanded.is_none() {
            let bytes = &self.secret[..self.algorithm.key_len()];
            let key = UnboundKey::new(self.algorithm, bytes)
                .map_err(|_| Fatal::send(alert::INTERNAL_ERROR, "a key that does not load"))?;
            self.expanded = Some(Box::new(LessSafeKey::new(key)));
        }
        Ok(self.expanded.as_deref().expect("expanded above"))
    }

    /// After a call: counts it if it used the key, and keeps the key
    /// expanded only from the second such call since the last rest.
    fn settle(&mut self) {
        if std::mem::take(&mut self.touched) {
            self.uses = self.uses.saturating_add(1);
        }
        if self.uses < 2 {
            self.expanded = None;
        }
    }

    /// The heartbeat: a direction used in at most one call since the last
    /// rest gives its expanded key back.
    fn rest(&mut self) {
        if self.uses < 2 {
            self.expanded = None;
        }
        self.uses = 0;
        self.touched = false;
    }

    /// IV ⊕ the sequence number, big-endian in the last 8 bytes.
    fn nonce_bytes(&self) -> [u8; aead::NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    /// Moves to the next record; a session may not wrap its sequence.
    fn advance(&mut self) -> Result<(), Fatal> {
        self.seq = self.seq.checked_add(1).ok_or(Fatal::send(
            alert::INTERNAL_ERROR,
            "sequence number exhausted",
        ))?;
        Ok(())
    }
}

/// TLS 1.2's additional data: sequence ‖ type ‖ version ‖ plaintext length.
fn tls12_aad(seq: u64, typ: u8, version: [u8; 2], len: usize) -> [u8; 13] {
    let mut aad = [0; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

/// The length of the record at the front of `buf`, its header included,
/// once the header is there (the record itself may not be whole yet).
pub(super) fn record_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..HEADER)?;
    Some(HEADER + usize::from(u16::from_be_bytes([header[3], header[4]])))
}

/// One direction of a session.
#[derive(Debug, Clone, Copy)]
enum Direction {
    Send,
    Receive,
}

/// What opening records found besides application data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opened {
    /// Every whole record was read; more may come.
    More,
    /// The peer sent `close_notify`: nothing after it is read.
    PeerClosed,
}

/// The record layer of one established session.
pub(super) struct RecordLayer {
    framing: Framing,
    tx: Keys,
    rx: Keys,
    /// Records one sending key may seal.
    limit: u64,
    /// TLS 1.3: rustls's key schedule, which derives the next keys.
    schedule: Option<Box<KernelConnection<ServerConnectionData>>>,
    /// The client asked for a key update: the next application data goes
    /// under a new key, announced first (one answer for any number of
    /// requests, RFC 8446 §4.6.3).
    owe_update: bool,
    /// Records without application data in a row (key updates, ignored
    /// alerts, empty records); more than [`MOST_QUIET_RECORDS`] fail the
    /// session, so a client cannot keep the gateway busy with them.
    quiet: u8,
}

/// The most records without application data in a row (rustls allows 32
/// key updates between application data).
const MOST_QUIET_RECORDS: u8 = 32;

impl std::fmt::Debug for RecordLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordLayer")
            .field("framing", &self.framing)
            .field("tx_seq", &self.tx.seq)
            .field("rx_seq", &self.rx.seq)
            .finish_non_exhaustive()
    }
}

impl RecordLayer {
    /// Takes over from a session whose handshake is done.
    pub(super) fn new(
        secrets: ExtractedSecrets,
        schedule: KernelConnection<ServerConnectionData>,
    ) -> Result<Self, Fatal> {
        let framing = match (schedule.protocol_version(), &secrets.tx.1) {
            (ProtocolVersion::TLSv1_3, _) => Framing::Tls13,
            (ProtocolVersion::TLSv1_2, ConnectionTrafficSecrets::Chacha20Poly1305 { .. }) => {
                Framing::Tls12Chacha
            }
            (ProtocolVersion::TLSv1_2, _) => Framing::Tls12Gcm,
            _ => {
                return Err(Fatal::send(
                    alert::INTERNAL_ERROR,
                    "unsupported protocol version",
                ))
            }
        };
        let limit = match schedule.negotiated_cipher_suite() {
            SupportedCipherSuite::Tls12(suite) => suite.common.confidentiality_limit,
            SupportedCipherSuite::Tls13(suite) => suite.common.confidentiality_limit,
        };
        let ExtractedSecrets { tx, rx } = secrets;
        Ok(Self {
            framing,
            tx: Keys::new(tx.0, tx.1)?,
            rx: Keys::new(rx.0, rx.1)?,
            limit,
            schedule: (framing == Framing::Tls13).then(|| Box::new(schedule)),
            owe_update: false,
            quiet: 0,
        })
    }

    /// Lowers the sending key's limit, so a test reaches it.
    #[cfg(test)]
    pub(super) fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// Records sealed under the current sending key (its sequence number).
    #[cfg(test)]
    pub(super) fn sent_under_key(&self) -> u64 {
        self.tx.seq
    }

    /// Whether each direction (sending, receiving) keeps its key expanded.
    #[cfg(test)]
    pub(super) fn expanded(&self) -> (bool, bool) {
        (self.tx.expanded.is_some(), self.rx.expanded.is_some())
    }

    /// The most `len` bytes of plaintext take once sealed.
    pub(super) fn sealed_len(len: usize) -> usize {
        len + len.div_ceil(MAX_FRAGMENT).max(1) * RECORD_OVERHEAD
    }

    /// Seals `data` as application-data records onto `out`.
    pub(super) fn seal_data(&mut self, data: &[u8], out: &mut BytesMut) -> Result<(), Fatal> {
        out.reserve(Self::sealed_len(data.len()));
        let sealed = data
            .chunks(MAX_FRAGMENT)
            .try_for_each(|fragment| self.seal(APPLICATION_DATA, fragment, out));
        self.settle();
        sealed
    }

    /// The heartbeat: each direction used in at most one call since the
    /// last rest gives its expanded key back (an idle connection keeps
    /// only the keys' bytes).
    pub(super) fn rest(&mut self) {
        self.tx.rest();
        self.rx.rest();
    }

    /// After each call: see [`Keys::settle`].
    fn settle(&mut self) {
        self.tx.settle();
        self.rx.settle();
    }

    /// Seals an alert onto `out` (`close_notify` as a warning, the rest
    /// fatal). The session's last record, so it is sealed even under a key
    /// at its limit (as the close a TLS 1.2 session ends with at the limit).
    pub(super) fn seal_alert(&mut self, description: u8, out: &mut BytesMut) -> Result<(), Fatal> {
        let level = if description == alert::CLOSE_NOTIFY {
            1
        } else {
            2
        };
        let sealed = self.seal_record(ALERT, &[level, description], out);
        self.settle();
        sealed
    }

    /// Seals one record, first replacing a key the client asked to
    /// replace or that reached its limit.
    fn seal(&mut self, typ: u8, fragment: &[u8], out: &mut BytesMut) -> Result<(), Fatal> {
        if std::mem::take(&mut self.owe_update) {
            self.update_tx(out)?;
        }
        if self.tx.seq >= self.limit {
            match self.framing {
                Framing::Tls13 => self.update_tx(out)?,
                // TLS 1.2 has no key update: the session ends.
                _ => {
                    return Err(Fatal::send(
                        alert::CLOSE_NOTIFY,
                        "the key's confidentiality limit is reached",
                    ))
                }
            }
        }
        self.seal_record(typ, fragment, out)
    }

    /// Announces a new sending key (a `KeyUpdate` under the old one) and
    /// switches to it. The new key is derived first, so a failure leaves
    /// the client and the gateway on the same key.
    fn update_tx(&mut self, out: &mut BytesMut) -> Result<(), Fatal> {
        let next = self.next_keys(Direction::Send)?;
        self.seal_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
        self.tx = next;
        Ok(())
    }

    /// The next key of one direction, from rustls's key schedule (TLS 1.3).
    fn next_keys(&mut self, direction: Direction) -> Result<Keys, Fatal> {
        let schedule = self
            .schedule
            .as_mut()
            .ok_or(Fatal::send(alert::INTERNAL_ERROR, "no key schedule"))?;
        let next = match direction {
            Direction::Send => schedule.update_tx_secret(),
            Direction::Receive => schedule.update_rx_secret(),
        };
        let (seq, secrets) =
            next.map_err(|_| Fatal::send(alert::INTERNAL_ERROR, "key update failed"))?;
        Keys::new(seq, secrets)
    }

    fn seal_record(&mut self, typ: u8, fragment: &[u8], out: &mut BytesMut) -> Result<(), Fatal> {
        let nonce = self.tx.nonce_bytes();
        let explicit = if self.framing == Framing::Tls12Gcm {
            EXPLICIT_NONCE
        } else {
            0
        };
        let inner_type = usize::from(self.framing == Framing::Tls13);
        let len = explicit + fragment.len() + inner_type + TAG;
        let outer = if self.framing == Framing::Tls13 {
            APPLICATION_DATA
        } else {
            typ
        };
        let header = [outer, 3, 3, (len >> 8) as u8, len as u8];
        out.reserve(HEADER + len);
        out.put_slice(&header);
        out.put_slice(&nonce[aead::NONCE_LEN - explicit..]);
        let start = out.len();
        out.put_slice(fragment);
        if inner_type == 1 {
            out.put_u8(typ);
        }
        let tls12;
        let aad: &[u8] = match self.framing {
            Framing::Tls13 => &header,
            _ => {
                tls12 = tls12_aad(self.tx.seq, typ, [3, 3], fragment.len());
                &tls12
            }
        };
        let sealed = self.tx.key().and_then(|key| {
            key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[start..],
            )
            .map_err(|_| Fatal::send(alert::INTERNAL_ERROR, "encryption failed"))
        });
        match sealed {
            Ok(tag) => out.put_slice(tag.as_ref()),
            Err(fatal) => {
                out.truncate(start - HEADER - explicit);
                return Err(fatal);
            }
        }
        self.tx.advance()
    }

    /// Opens every whole record at the front of `incoming` (which keeps
    /// the start of one not yet whole): application data onto `plain`.
    pub(super) fn open(
        &mut self,
        incoming: &mut BytesMut,
        plain: &mut BytesMut,
    ) -> Result<Opened, Fatal> {
        let opened = self.open_all(incoming, plain);
        self.settle();
        opened
    }

    fn open_all(&mut self, incoming: &mut BytesMut, plain: &mut BytesMut) -> Result<Opened, Fatal> {
        loop {
            let Some(whole) = record_len(incoming) else {
                return Ok(Opened::More);
            };
            let len = whole - HEADER;
            let most = match self.framing {
                Framing::Tls13 => MAX_FRAGMENT + 256,
                _ => MAX_FRAGMENT + 2048,
            };
            if len > most {
                return Err(Fatal::send(alert::RECORD_OVERFLOW, "record too long"));
            }
            if incoming.len() < whole {
                return Ok(Opened::More);
            }
            let (header, body) = incoming[..whole].split_at_mut(HEADER);
            let (typ, content) = self.open_record(header, body)?;
            let opened = self.take(typ, content, plain)?;
            incoming.advance(whole);
            if opened == Opened::PeerClosed {
                return Ok(opened);
            }
        }
    }

    /// Authenticates and decrypts one record in place: its content type
    /// and content.
    fn open_record<'a>(
        &mut self,
        header: &[u8],
        body: &'a mut [u8],
    ) -> Result<(u8, &'a [u8]), Fatal> {
        let outer = header[0];
        if header[1] != 3 {
            return Err(Fatal::send(alert::DECODE_ERROR, "not a TLS record"));
        }
        let bad_mac = Fatal::send(alert::BAD_RECORD_MAC, "a record did not authenticate");
        let opened = match self.framing {
            Framing::Tls13 => {
                // Every record after the handshake is protected.
                if outer != APPLICATION_DATA {
                    return Err(Fatal::send(
                        alert::UNEXPECTED_MESSAGE,
                        "an unprotected record after the handshake",
                    ));
                }
                let nonce = Nonce::assume_unique_for_key(self.rx.nonce_bytes());
                self.rx.key()?.open_in_place(nonce, Aad::from(header), body)
            }
            Framing::Tls12Gcm => {
                if body.len() < EXPLICIT_NONCE + TAG {
                    return Err(bad_mac);
                }
                let mut nonce = self.rx.iv;
                nonce[4..].copy_from_slice(&body[..EXPLICIT_NONCE]);
                let aad = tls12_aad(
                    self.rx.seq,
                    outer,
                    [header[1], header[2]],
                    body.len() - EXPLICIT_NONCE - TAG,
                );
                self.rx.key()?.open_within(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    body,
                    EXPLICIT_NONCE..,
                )
            }
            Framing::Tls12Chacha => {
                if body.len() < TAG {
                    return Err(bad_mac);
                }
                let aad = tls12_aad(self.rx.seq, outer, [header[1], header[2]], body.len() - TAG);
                let nonce = Nonce::assume_unique_for_key(self.rx.nonce_bytes());
                self.rx.key()?.open_in_place(nonce, Aad::from(aad), body)
            }
        };
        let opened: &'a [u8] = opened.map_err(|_| bad_mac)?;
        self.rx.advance()?;
        // TLS 1.3's inner plaintext holds the content type and padding too.
        let most = MAX_FRAGMENT + usize::from(self.framing == Framing::Tls13);
        if opened.len() > most {
            return Err(Fatal::send(alert::RECORD_OVERFLOW, "record too long"));
        }
        let (typ, content) = match self.framing {
            // The content type is the last byte that is not padding.
            Framing::Tls13 => {
                let end = opened.iter().rposition(|&b| b != 0).ok_or(Fatal::send(
                    alert::UNEXPECTED_MESSAGE,
                    "a record with no content type",
                ))?;
                (opened[end], &opened[..end])
            }
            _ => (outer, opened),
        };
        Ok((typ, content))
    }

    /// Acts on one opened record.
    fn take(&mut self, typ: u8, content: &[u8], plain: &mut BytesMut) -> Result<Opened, Fatal> {
        let unexpected = |reason| Fatal::send(alert::UNEXPECTED_MESSAGE, reason);
        if typ == APPLICATION_DATA && !content.is_empty() {
            self.quiet = 0;
        } else {
            self.quiet = self.quiet.saturating_add(1);
            if self.quiet > MOST_QUIET_RECORDS {
                return Err(unexpected("too many records without application data"));
            }
        }
        match typ {
            APPLICATION_DATA => {
                plain.extend_from_slice(content);
                Ok(Opened::More)
            }
            ALERT => {
                let &[level, description] = content else {
                    return Err(Fatal::send(alert::DECODE_ERROR, "a malformed alert"));
                };
                let ignored = match self.framing {
                    Framing::Tls13 => description == alert::USER_CANCELED,
                    _ => level == 1,
                };
                if description == alert::CLOSE_NOTIFY {
                    Ok(Opened::PeerClosed)
                } else if ignored {
                    Ok(Opened::More)
                } else {
                    Err(Fatal {
                        alert: None,
                        reason: "the client sent a fatal alert",
                    })
                }
            }
            HANDSHAKE if self.framing == Framing::Tls13 => {
                self.key_update(content)?;
                Ok(Opened::More)
            }
            HANDSHAKE => Err(unexpected("renegotiation is not offered")),
            CHANGE_CIPHER_SPEC => Err(unexpected("change_cipher_spec after the handshake")),
            _ => Err(unexpected("an unknown record type")),
        }
    }

    /// A TLS 1.3 handshake record after the handshake: only `KeyUpdate`,
    /// whole and last in its record (RFC 8446 §4.6.3, §5.1). The receiving
    /// key changes at once; an update the client asks for is sent before
    /// the next application data.
    fn key_update(&mut self, content: &[u8]) -> Result<(), Fatal> {
        let decode = Fatal::send(alert::DECODE_ERROR, "a malformed key update");
        let &[typ, a, b, c, ref rest @ ..] = content else {
            return Err(decode);
        };
        if typ != KEY_UPDATE {
            return Err(Fatal::send(
                alert::UNEXPECTED_MESSAGE,
                "a handshake message after the handshake",
            ));
        }
        if [a, b, c] != [0, 0, 1] {
            return Err(decode);
        }
        let request = match rest {
            &[request] => request,
            // A key update split over records is not taken.
            [] => return Err(decode),
            _ => {
                return Err(Fatal::send(
                    alert::UNEXPECTED_MESSAGE,
                    "a key update not at the end of its record",
                ))
            }
        };
        if request > 1 {
            return Err(Fatal::send(
                alert::ILLEGAL_PARAMETER,
                "a key update with an unknown request",
            ));
        }
        self.rx = self.next_keys(Direction::Receive)?;
        self.owe_update |= request == 1;
        Ok(())
    }
}
