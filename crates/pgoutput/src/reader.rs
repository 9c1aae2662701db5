//! A bounds-checked cursor over one message's bytes.
//!
//! Every read checks the remaining length first and returns a [`DecodeError`] naming the field,
//! so the decoder cannot panic or read past the input whatever the bytes are.

use bytes::Bytes;

use crate::error::{DecodeError, ErrorKind};

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    tag: u8,
}

impl<'a> Reader<'a> {
    /// A reader over `buf` starting at offset `pos` (offsets stay relative to `buf`).
    pub(crate) fn new(buf: &'a [u8], pos: usize, tag: u8) -> Self {
        Self {
            buf,
            pos: pos.min(buf.len()),
            tag,
        }
    }

    pub(crate) fn err(&self, field: &'static str, kind: ErrorKind) -> DecodeError {
        DecodeError::new(self.tag, field, kind)
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let available = self.remaining();
        if n > available {
            return Err(self.err(
                field,
                ErrorKind::UnexpectedEnd {
                    needed: n,
                    available,
                },
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(field)?))
    }

    /// A NUL-terminated UTF-8 string (names: rare messages, so owning is fine).
    pub(crate) fn cstr(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.err(field, ErrorKind::UnterminatedString))?;
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| self.err(field, ErrorKind::InvalidUtf8))?
            .to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    /// The next `n` bytes as a zero-copy slice of `owner` (which must be the reader's buffer).
    pub(crate) fn bytes(
        &mut self,
        owner: &Bytes,
        n: usize,
        field: &'static str,
    ) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, field)?;
        Ok(owner.slice(start..start + n))
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(self.err("end", ErrorKind::TrailingBytes(n))),
        }
    }
}
