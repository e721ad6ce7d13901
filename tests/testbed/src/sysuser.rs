//! Looks up system users and groups (root vs. ordinary user set-ups of Dovecot).

use std::ffi::{CStr, CString};

use anyhow::{Context as _, bail};

/// A system account as far as Dovecot's configuration needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// True when the process runs with effective uid 0.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The account of the effective uid.
pub(crate) fn current() -> anyhow::Result<Account> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    lookup(Key::Uid(uid)).with_context(|| format!("looking up the running user (uid {uid})"))
}

/// The account named `name`.
pub(crate) fn by_name(name: &str) -> anyhow::Result<Account> {
    lookup(Key::Name(name)).with_context(|| format!("looking up system user '{name}'"))
}

/// The name of group `gid`, or the number as text when it has no name.
pub(crate) fn group_name(gid: u32) -> String {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero `group` is a valid value for getgrgid_r to overwrite.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to live memory of the stated size.
    let rc = unsafe {
        libc::getgrgid_r(
            gid,
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return gid.to_string();
    }
    // SAFETY: on success gr_name points to a NUL-terminated string inside `buf`.
    unsafe { CStr::from_ptr(grp.gr_name) }
        .to_string_lossy()
        .into_owned()
}

enum Key<'a> {
    Uid(u32),
    Name(&'a str),
}

fn lookup(key: Key<'_>) -> anyhow::Result<Account> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero `passwd` is a valid value for getpw*_r to overwrite.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = match key {
        // SAFETY: every pointer refers to live memory of the stated size.
        Key::Uid(uid) => unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        },
        Key::Name(name) => {
            let cname = CString::new(name).context("user name contains NUL")?;
            // SAFETY: every pointer refers to live memory of the stated size.
            unsafe {
                libc::getpwnam_r(
                    cname.as_ptr(),
                    &mut pwd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut result,
                )
            }
        }
    };
    if rc != 0 {
        bail!("getpw*_r failed: {}", std::io::Error::from_raw_os_error(rc));
    }
    if result.is_null() {
        bail!("no such user");
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
    let name = unsafe { CStr::from_ptr(pwd.pw_name) }
        .to_string_lossy()
        .into_owned();
    Ok(Account {
        name,
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_user_resolves() {
        let me = current().unwrap();
        assert_eq!(by_name(&me.name).unwrap().uid, me.uid);
        assert!(!group_name(me.gid).is_empty());
    }
}
