//! Fixed newstyle handshake: STRUCTURED_REPLY, SET_META_CONTEXT, GO (or EXPORT_NAME).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::BlockSize;
use crate::error::NbdError;
use crate::proto::*;

pub(crate) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub contexts: Vec<(String, u32)>,
    pub block_size: Option<BlockSize>,
}

struct OptReply {
    rep: u32,
    data: Vec<u8>,
}

async fn send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    opt: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let len = u32::try_from(data.len()).map_err(|_| NbdError::TooLarge {
        what: "option data",
        len: data.len() as u64,
        max: u64::from(u32::MAX),
    })?;
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&opt.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).await?;
    s.flush().await?;
    Ok(())
}

async fn read_reply<S: AsyncRead + Unpin>(s: &mut S, opt: u32) -> Result<OptReply, NbdError> {
    let magic = s.read_u64().await?;
    if magic != OPT_REPLY_MAGIC {
        return Err(NbdError::protocol(
            format!("option reply magic {OPT_REPLY_MAGIC:#x}"),
            format!("{magic:#x}"),
        ));
    }
    let ropt = s.read_u32().await?;
    if ropt != opt {
        return Err(NbdError::protocol(
            format!("reply to {}", opt_name(opt)),
            format!("reply to option {ropt}"),
        ));
    }
    let rep = s.read_u32().await?;
    let len = s.read_u32().await?;
    if len > MAX_OPTION_REPLY {
        return Err(NbdError::TooLarge {
            what: "option reply",
            len: u64::from(len),
            max: u64::from(MAX_OPTION_REPLY),
        });
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await?;
    Ok(OptReply { rep, data })
}

fn rejected(opt: u32, r: OptReply) -> NbdError {
    NbdError::OptionRejected {
        option: opt,
        reply: r.rep,
        message: String::from_utf8_lossy(&r.data).trim_end().to_string(),
    }
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn push_string(buf: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), NbdError> {
    if s.len() > MAX_STRING {
        return Err(NbdError::TooLarge {
            what,
            len: s.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
    Ok(())
}

pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    meta_contexts: &[&str],
) -> Result<Negotiated, NbdError> {
    // Validate our own inputs before talking.
    let mut export_data = Vec::new();
    push_string(&mut export_data, export, "export name")?;

    let magic = s.read_u64().await?;
    if magic != NBDMAGIC {
        return Err(NbdError::protocol("NBDMAGIC", format!("{magic:#x}")));
    }
    let magic = s.read_u64().await?;
    if magic == CLISERV_MAGIC {
        return Err(NbdError::protocol(
            "newstyle negotiation (IHAVEOPT)",
            "oldstyle server",
        ));
    }
    if magic != IHAVEOPT {
        return Err(NbdError::protocol("IHAVEOPT", format!("{magic:#x}")));
    }
    let hs_flags = s.read_u16().await?;
    if hs_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::protocol(
            "fixed newstyle server (NBD_FLAG_FIXED_NEWSTYLE)",
            format!("handshake flags {hs_flags:#x}"),
        ));
    }
    let no_zeroes = hs_flags & FLAG_NO_ZEROES != 0;
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (hs_flags & FLAG_NO_ZEROES));
    s.write_all(&client_flags.to_be_bytes()).await?;

    // Structured replies.
    send_option(s, OPT_STRUCTURED_REPLY, &[]).await?;
    let r = read_reply(s, OPT_STRUCTURED_REPLY).await?;
    let structured = match r.rep {
        REP_ACK => true,
        rep if rep & REP_FLAG_ERROR != 0 => {
            tracing::debug!(reply = rep_name(rep), "server has no structured replies");
            false
        }
        rep => {
            return Err(NbdError::protocol(
                "NBD_REP_ACK or an error to NBD_OPT_STRUCTURED_REPLY",
                rep_name(rep),
            ));
        }
    };

    // Metadata contexts (only meaningful with structured replies).
    let mut contexts = Vec::new();
    if structured && !meta_contexts.is_empty() {
        let mut data = export_data.clone();
        data.extend_from_slice(&(meta_contexts.len() as u32).to_be_bytes());
        for q in meta_contexts {
            push_string(&mut data, q, "metadata context name")?;
        }
        send_option(s, OPT_SET_META_CONTEXT, &data).await?;
        loop {
            let r = read_reply(s, OPT_SET_META_CONTEXT).await?;
            match r.rep {
                REP_META_CONTEXT => {
                    let id = be_u32(&r.data, 0).ok_or_else(|| {
                        NbdError::protocol("NBD_REP_META_CONTEXT with an id", "short payload")
                    })?;
                    let name = String::from_utf8_lossy(&r.data[4..]).to_string();
                    if contexts.len() >= meta_contexts.len() * 4 + 16 {
                        return Err(NbdError::protocol(
                            "one context per query",
                            "an endless list of contexts",
                        ));
                    }
                    contexts.push((name, id));
                }
                REP_ACK => break,
                REP_ERR_UNSUP | REP_ERR_POLICY => {
                    tracing::debug!(
                        reply = rep_name(r.rep),
                        "server grants no metadata contexts"
                    );
                    contexts.clear();
                    break;
                }
                rep if rep & REP_FLAG_ERROR != 0 => return Err(rejected(OPT_SET_META_CONTEXT, r)),
                rep => {
                    return Err(NbdError::protocol(
                        "NBD_REP_META_CONTEXT or NBD_REP_ACK",
                        rep_name(rep),
                    ));
                }
            }
        }
    }

    // GO with a block-size info request.
    let mut data = export_data.clone();
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data).await?;
    let mut export_info: Option<(u64, u16)> = None;
    let mut block_size = None;
    loop {
        let r = read_reply(s, OPT_GO).await?;
        match r.rep {
            REP_INFO => {
                let short = || NbdError::protocol("complete NBD_REP_INFO", "short payload");
                match be_u16(&r.data, 0).ok_or_else(short)? {
                    INFO_EXPORT => {
                        let size = be_u64(&r.data, 2).ok_or_else(short)?;
                        let flags = be_u16(&r.data, 10).ok_or_else(short)?;
                        export_info = Some((size, flags));
                    }
                    INFO_BLOCK_SIZE => {
                        let min = be_u32(&r.data, 2).ok_or_else(short)?;
                        let preferred = be_u32(&r.data, 6).ok_or_else(short)?;
                        let max = be_u32(&r.data, 10).ok_or_else(short)?;
                        block_size = Some(BlockSize {
                            min,
                            preferred,
                            max,
                        });
                    }
                    other => tracing::debug!(info = other, "ignoring NBD_INFO"),
                }
            }
            REP_ACK => break,
            REP_ERR_UNSUP => {
                // Pre-GO server: NBD_OPT_EXPORT_NAME cannot fail politely.
                send_option(s, OPT_EXPORT_NAME, &export_data[4..]).await?;
                let size = s.read_u64().await?;
                let flags = s.read_u16().await?;
                if !no_zeroes {
                    let mut z = [0u8; 124];
                    s.read_exact(&mut z).await?;
                }
                export_info = Some((size, flags));
                break;
            }
            rep if rep & REP_FLAG_ERROR != 0 => return Err(rejected(OPT_GO, r)),
            rep => {
                return Err(NbdError::protocol(
                    "NBD_REP_INFO or NBD_REP_ACK",
                    rep_name(rep),
                ));
            }
        }
    }
    let (size, flags) = export_info
        .ok_or_else(|| NbdError::protocol("NBD_INFO_EXPORT before NBD_REP_ACK", "none"))?;
    if flags & TF_HAS_FLAGS == 0 {
        return Err(NbdError::protocol(
            "transmission flags with NBD_FLAG_HAS_FLAGS",
            format!("{flags:#x}"),
        ));
    }
    if let Some(b) = block_size {
        let ok = b.min.is_power_of_two()
            && b.min <= 64 * 1024
            && b.preferred.is_power_of_two()
            && b.preferred >= b.min.max(512)
            && b.max >= b.min;
        if !ok {
            return Err(NbdError::protocol(
                "sane NBD_INFO_BLOCK_SIZE",
                format!("{b:?}"),
            ));
        }
    }
    Ok(Negotiated {
        size,
        flags,
        structured,
        contexts,
        block_size,
    })
}
