//! NBD wire constants (values from the NBD protocol specification, doc/proto.md).

pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(crate) const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
pub(crate) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;

// Transmission flags.
pub(crate) const TF_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const TF_READ_ONLY: u16 = 1 << 1;
pub(crate) const TF_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TF_SEND_FUA: u16 = 1 << 3;
pub(crate) const TF_ROTATIONAL: u16 = 1 << 4;
pub(crate) const TF_SEND_TRIM: u16 = 1 << 5;
pub(crate) const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(crate) const TF_SEND_DF: u16 = 1 << 7;
pub(crate) const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub(crate) const TF_SEND_CACHE: u16 = 1 << 10;
pub(crate) const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;
pub(crate) const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_FLAG_ERROR: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub(crate) const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub(crate) const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub(crate) const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub(crate) const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub(crate) const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub(crate) const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub(crate) const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub(crate) const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// NBD_INFO types.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Structured reply.
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(crate) const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub(crate) const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
pub(crate) const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// Longest string the protocol allows (export names, messages, context names).
pub(crate) const MAX_STRING: usize = 4096;
/// Upper bound for one option reply payload accepted from a server.
pub(crate) const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Upper bound for one NBD_REPLY_TYPE_BLOCK_STATUS payload (1 Mi descriptors).
pub(crate) const MAX_STATUS_PAYLOAD: u32 = 4 + 8 * (1 << 20);
/// Upper bound for an error chunk payload (errno, length, message, offset).
pub(crate) const MAX_ERROR_PAYLOAD: u32 = 4 + 2 + MAX_STRING as u32 + 8;
/// Default and absolute cap for one read/write payload.
pub(crate) const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

pub(crate) fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

pub(crate) fn rep_name(rep: u32) -> &'static str {
    match rep {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "unknown reply",
    }
}

/// Name of an NBD error value (the protocol's own numbering, not the host's).
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}
