#!/usr/bin/env python3
"""Deterministic synthetic mail corpus for the mailintake throughput benchmark.

    gen_corpus.py --profile efiling  --n 2000  --seed 42 --out DIR
    gen_corpus.py --profile helpdesk --n 10000 --seed 42 --out DIR

Writes DIR/new/ (one file per message, the way a delivery agent leaves them in a Maildir: LF
line endings, ",S=<bytes>,W=<bytes with CRLF>" in the name, mtime = the Date header so Dovecot
uses it as INTERNALDATE), then DIR/manifest.tsv and, last, DIR/stats.json (its presence marks a
complete corpus). Every random choice and every payload byte comes from one random.Random(seed),
so the same profile/N/seed gives byte-identical files.

Profiles (exact counts per kind, assigned by a seeded shuffle; rounding remainder goes to the
first kind listed):

efiling  - submissions to a court's / authority's filing office (default N=2000, ~3.7 GB):
  40% short     text/plain UTF-8, quoted-printable, Czech text, encoded-word Subject/From, 1-8 KB
  40% attach    multipart/mixed: text + 1-3 PDF attachments of 50 KB-2 MB each (log-uniform)
  10% forward   multipart/mixed: a note + message/rfc822 (the forwarded submission, which carries
                its own multipart/mixed body with one PDF)
   5% smime     multipart/signed (protocol application/pkcs7-signature): the signed entity
                (text, half of them with a PDF) + smime.p7s of ~3 KB of DER-looking bytes
   5% big       multipart/mixed: text + one PDF attachment of 10-25 MB
  PDFs are a minimal but well-formed PDF skeleton (catalog, page tree, page, xref, trailer)
  around a random binary "FlateDecode" stream, base64 in 76-column lines: incompressible.
  Attachment file names are ASCII, RFC 2231 (filename*=UTF-8''...) or encoded-word (Outlook).

helpdesk - small support mail (default N=10000, ~150 MB): 1-30 KB each
  60% plain     text/plain UTF-8 quoted-printable, often with a quoted earlier reply
  30% html      multipart/alternative: text/plain + text/html
  10% image     multipart/mixed: text + a small PNG/JPEG screenshot (2-12 KB)
"""
import argparse
import base64
import json
import math
import os
import quopri
import random
import sys
import time
import urllib.parse

# --------------------------------------------------------------------------- vocabulary
GIVEN = ["Vojtěch", "Radka", "Miloš", "Šárka", "Přemysl", "Ludmila", "Čeněk", "Zuzana",
         "Kryštof", "Věra", "Bohumil", "Alžběta", "Dušan", "Hana", "Řehoř", "Ilona",
         "Matěj", "Blanka", "Oldřich", "Jitka"]
FAMILY = ["Kratochvíl", "Sýkorová", "Doležal", "Vávrová", "Bartoš", "Šťastná", "Zeman",
          "Kolářová", "Holub", "Benešová", "Říha", "Čermáková", "Fiala", "Můllerová",
          "Jelínek", "Tůmová", "Hrubý", "Ševčíková", "Král", "Žižková"]
MAIL_DOMAINS = ["seznam.cz", "email.cz", "post.cz", "volny.cz", "centrum.cz",
                "akbartos.cz", "advokacie-brno.cz", "gmail.com", "outlook.com"]
AGENTS = ["Mozilla Thunderbird 128.3.1", "Microsoft Outlook 16.0", "Roundcube Webmail/1.6.9",
          "Apple Mail (2.3774)", "Seznam Email", "K-9 Mail for Android"]

EF_SUBJECTS = [
    "Žaloba o zaplacení {amt} Kč – {ref}",
    "Podání k sp. zn. {ref}",
    "Odpor proti platebnímu rozkazu č. j. {ref}",
    "Návrh na předběžné opatření (věc {ref})",
    "Žádost o prodloužení lhůty – {ref}",
    "Vyjádření k odvolání, sp. zn. {ref}",
    "Omluva z jednání dne {day}. {month}. 2025",
    "Námitka podjatosti – řízení {ref}",
    "Návrh na obnovu řízení ve věci {ref}",
    "Sdělení účastníka řízení – změna adresy",
    "Přihláška pohledávky do insolvenčního řízení {ref}",
    "Žádost o vydání stejnopisu rozhodnutí s doložkou právní moci",
]
EF_PARAS = [
    "Vážení,\n\njménem svého klienta podávám v příloze uvedený dokument ve věci vedené pod "
    "sp. zn. {ref}. Prosím o potvrzení doručení.",
    "Navrhovatel se domáhá uložení povinnosti zaplatit částku {amt} Kč spolu se zákonným "
    "úrokem z prodlení od 1. 4. 2025 do zaplacení.",
    "K důkazu navrhuji: smlouvu o úvěru ze dne 14. 2. 2024, výpis z účtu, předžalobní výzvu "
    "ze dne 3. 1. 2025 a doručenku České pošty.",
    "Dlužník přes opakované upomínky svůj závazek neplní, a proto je navrhovatel nucen "
    "domáhat se svého práva soudní cestou.",
    "Sděluji, že se z vážných zdravotních důvodů nemohu zúčastnit jednání nařízeného na "
    "{day}. {month}. 2025; lékařskou zprávu přikládám.",
    "Žádám, aby mi písemnosti byly doručovány výhradně do datové schránky (ID {dsid}).",
    "Poučení: proti tomuto usnesení je přípustné odvolání do patnácti dnů ode dne jeho "
    "doručení ke krajskému soudu prostřednictvím soudu podepsaného.",
    "Účastník řízení tímto bere svůj návrh zpět v celém rozsahu a navrhuje, aby soud řízení "
    "zastavil a rozhodl, že žádný z účastníků nemá právo na náhradu nákladů řízení.",
    "Ověřovací věta: Nechť již hříšné saxofony ďáblů rozezvučí síň úděsnými tóny waltzu, "
    "tanga a quickstepu. ĚŠČŘŽÝÁÍÉÚŮ ěščřžýáíéúů ďťň ĎŤŇ.",
    "S úctou\n\n{name}\nadvokát, ev. č. ČAK {cak}\nMasarykova 412/18, 602 00 Brno",
]
FILES_ASCII = ["zaloba.pdf", "navrh_{k}.pdf", "plna-moc.pdf", "priloha{k}.pdf",
               "vypis_z_uctu_{k}.pdf", "smlouva.pdf", "SCAN_{k:04d}.pdf"]
FILES_CZ = ["Žaloba na plnění.pdf", "Plná moc – {name}.pdf", "Příloha č. {k}.pdf",
            "Lékařská zpráva.pdf", "Předžalobní výzva.pdf", "Výpis z katastru nemovitostí.pdf",
            "Usnesení – stejnopis {k}.pdf", "Důkazní prostředky č. {k}.pdf"]

HD_SUBJECTS = [
    "Nefunguje přihlášení do portálu", "Tiskárna ve 2. patře hlásí chybu",
    "Žádost o reset hesla", "Pomalé VPN připojení z domova", "Chyba při exportu do PDF",
    "Nový zaměstnanec – zřízení účtu", "Outlook se nesynchronizuje", "Výpadek sdíleného disku",
    "Licence pro Office vypršela", "Požadavek na nový monitor", "Certifikát pro e-podpis",
    "Chybová hláška 0x80070005 při aktualizaci",
]
HD_PARAS = [
    "Dobrý den,\n\nod rána se nemohu přihlásit, systém píše „neplatné přihlašovací údaje“, "
    "přestože heslo jsem neměnil.",
    "Zkoušel jsem restart počítače i odhlášení a znovu přihlášení, bez úspěchu.",
    "Chyba se objevuje jen u některých souborů, hlavně u těch větších než 10 MB.",
    "Prosím o co nejrychlejší vyřešení, odpoledne máme uzávěrku a potřebuji tisknout smlouvy.",
    "V příloze posílám snímek obrazovky s chybovou hláškou.",
    "Kolegyně v kanceláři č. 214 má stejný problém, takže to asi nebude jen mým počítačem.",
    "Verze aplikace: 4.12.3 (build 2025-02-17), Windows 11 Pro 23H2.",
    "Děkuji za rychlou odpověď, bohužel to stále nefunguje – viz níže.",
    "Díky, teď už to jede. Požadavek můžete uzavřít.",
    "S pozdravem\n{name}\nodbor správních činností, tel. 545 17{cak}",
]


def loguniform(rng, lo, hi):
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def b64_lines(data):
    """base64 in 76-character lines, each ending in LF (like base64.encodebytes, faster)."""
    s = base64.b64encode(data)
    return b"\n".join([s[i:i + 76] for i in range(0, len(s), 76)]) + b"\n"


def qp(text):
    return quopri.encodestring(text.encode("utf-8")).decode("ascii")


# --------------------------------------------------------------------------- generator
class Gen:
    def __init__(self, seed, profile):
        self.rng = random.Random(seed)
        self.profile = profile
        self.parts_seq = 0
        self.att = {"pdf": 0, "image": 0, "pkcs7_signature": 0, "message_rfc822": 0}

    # ---- header encoding (RFC 2047), written here rather than with email.header so that the
    # ---- output does not depend on the stdlib's folding decisions
    def encoded_words(self, text):
        if all(32 <= ord(c) < 127 for c in text):
            return text
        if self.rng.random() < 0.5:                       # B encoding, <= 45 raw bytes per word
            words, cur = [], b""
            for ch in text:
                b = ch.encode("utf-8")
                if len(cur) + len(b) > 45:
                    words.append(cur)
                    cur = b""
                cur += b
            words.append(cur)
            enc = ["=?UTF-8?B?" + base64.b64encode(w).decode("ascii") + "?=" for w in words]
        else:                                             # Q encoding, <= 60 encoded chars
            enc, cur = [], ""
            for ch in text:
                if ch == " ":
                    piece = "_"
                elif ch.isascii() and (ch.isalnum() or ch in "-!*+/.,"):
                    piece = ch
                else:
                    piece = "".join("=%02X" % x for x in ch.encode("utf-8"))
                if len(cur) + len(piece) > 60:
                    enc.append("=?UTF-8?Q?" + cur + "?=")
                    cur = ""
                cur += piece
            enc.append("=?UTF-8?Q?" + cur + "?=")
        return "\n ".join(enc)

    def person(self):
        g, f = self.rng.choice(GIVEN), self.rng.choice(FAMILY)
        ascii_ = str.maketrans("áčďéěíňóřšťúůýžÁČĎÉĚÍŇÓŘŠŤÚŮÝŽ", "acdeeinorstuuyzACDEEINORSTUUYZ")
        local = f"{g}.{f}".translate(ascii_).lower()
        return f"{g} {f}", f"{local}{self.rng.randint(1, 99)}@{self.rng.choice(MAIL_DOMAINS)}"

    def fill(self):
        r = self.rng
        return {"ref": f"{r.randint(1, 45)} C {r.randint(1, 2999)}/{r.choice([2024, 2025])}",
                "amt": f"{r.randint(1, 999)} {r.randint(0, 999):03d}",
                "day": r.randint(1, 28), "month": r.randint(1, 12),
                "dsid": "".join(r.choice("abcdefghijkmnpqrstuvwxyz23456789") for _ in range(7)),
                "cak": r.randint(10000, 19999)}

    def boundary(self):
        self.parts_seq += 1
        return f"=_mib_{self.parts_seq:07d}_{self.rng.getrandbits(48):012x}"

    @staticmethod
    def date_header(ts):
        # Central European time with a numeric zone; summer time approximated by month (no tzdata).
        off = 2 if time.gmtime(ts).tm_mon in (4, 5, 6, 7, 8, 9, 10) else 1
        t = time.gmtime(ts + off * 3600)
        days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
        months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        return (f"{days[t.tm_wday]}, {t.tm_mday} {months[t.tm_mon - 1]} {t.tm_year} "
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0{off}00")

    def headers(self, ts, idx, subject, to_addr, to_name, frm=None, extra=()):
        r = self.rng
        name, addr = frm or self.person()
        dom = addr.split("@")[1]
        mid = f"<{self.profile}.{idx:07d}.{r.getrandbits(64):016x}@{dom}>"
        recv_ts = ts + r.randint(1, 20)
        lines = [
            f"Return-Path: <{addr}>",
            f"Delivered-To: {to_addr}",
            f"Received: from mx.{dom} (mx.{dom} [198.51.100.{r.randint(1, 254)}])",
            f"\tby mailgw.example.cz (Postfix) with ESMTPS id 4X{r.getrandbits(36):09X}",
            f"\tfor <{to_addr}>; {self.date_header(recv_ts)}",
            f"Message-ID: {mid}",
            f"Date: {self.date_header(ts)}",
            f"From: {self.encoded_words(name)} <{addr}>",
            f"To: {self.encoded_words(to_name)} <{to_addr}>",
        ]
        if r.random() < 0.15:
            cn, ca = self.person()
            lines.append(f"Cc: {self.encoded_words(cn)} <{ca}>")
        lines += [f"Subject: {self.encoded_words(subject)}",
                  "MIME-Version: 1.0",
                  f"User-Agent: {r.choice(AGENTS)}"]
        lines += list(extra)
        return "\n".join(lines) + "\n", name

    # ---- bodies
    def text_of(self, paras, target, name):
        """Paragraphs until the quoted-printable body has about `target` bytes (cut at a space)."""
        target = max(150, int(target))
        out = []
        while True:
            out.append(self.rng.choice(paras).format(name=name, **self.fill()))
            body = "\n\n".join(out) + "\n"
            if len(qp(body)) >= target:
                break
        for _ in range(4):
            enc = len(qp(body))
            if enc <= target:
                break
            cut = body[:int(len(body) * target / enc)]
            para = cut.rfind("\n\n")
            if para > len(cut) // 2:
                cut = cut[:para]
            elif cut.rfind(" ") > 20:
                cut = cut[:cut.rfind(" ")]
            body = cut.rstrip() + "\n"
        return body

    @staticmethod
    def text_entity(text, flowed=False):
        fmt = "; format=flowed" if flowed else ""
        return ("Content-Type: text/plain; charset=UTF-8" + fmt + "\n"
                "Content-Transfer-Encoding: quoted-printable\n\n" + qp(text)).encode("ascii")

    @staticmethod
    def html_entity(text):
        esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        html = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"></head>\n<body style=\""
                "font-family: Calibri, sans-serif\">\n"
                + "".join("<p>" + p.replace("\n", "<br>\n") + "</p>\n" for p in esc.split("\n\n"))
                + "</body></html>\n")
        return ("Content-Type: text/html; charset=UTF-8\n"
                "Content-Transfer-Encoding: quoted-printable\n\n" + qp(html)).encode("ascii")

    def multipart(self, subtype, entities, params=""):
        """(Content-Type header line(s), body bytes) of a multipart entity."""
        b = self.boundary()
        chunks = [b"This is a multi-part message in MIME format.\n"]
        for e in entities:
            chunks += [f"\n--{b}\n".encode("ascii"), e.rstrip(b"\n") + b"\n"]
        chunks.append(f"\n--{b}--\n".encode("ascii"))
        return f"Content-Type: multipart/{subtype};{params}\n boundary=\"{b}\"", b"".join(chunks)

    # ---- attachments
    def pdf_bytes(self, size):
        """A minimal well-formed PDF of `size` bytes around a random binary stream."""
        head = [b"%PDF-1." + str(self.rng.randint(4, 7)).encode() + b"\n%\xe2\xe3\xcf\xd3\n"]
        objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
                b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << >> /Contents 4 0 R >>"]
        offsets, pos = [], len(head[0])
        for i, o in enumerate(objs, 1):
            chunk = b"%d 0 obj\n" % i + o + b"\nendobj\n"
            offsets.append(pos)
            head.append(chunk)
            pos += len(chunk)
        stream_len = max(64, size - pos - 260)
        offsets.append(pos)
        head.append(b"4 0 obj\n<< /Length %d /Filter /FlateDecode >>\nstream\n" % stream_len)
        start = b"".join(head)
        stream = self.rng.randbytes(stream_len)
        xref_pos = len(start) + stream_len + len(b"\nendstream\nendobj\n")
        tail = (b"\nendstream\nendobj\nxref\n0 5\n0000000000 65535 f \n"
                + b"".join(b"%010d 00000 n \n" % o for o in offsets)
                + b"trailer\n<< /Size 5 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % xref_pos)
        return start + stream + tail

    def file_name(self, name):
        r, k = self.rng, self.rng.randint(1, 40)
        x = r.random()
        if x < 0.45:
            return r.choice(FILES_ASCII).format(k=k), "ascii"
        return r.choice(FILES_CZ).format(k=k, name=name), ("rfc2231" if x < 0.8 else "encoded-word")

    def attachment(self, ctype, fname, style, data):
        if style == "ascii":
            ct, cd = f'{ctype}; name="{fname}"', f'attachment; filename="{fname}"'
        elif style == "rfc2231":
            q = urllib.parse.quote(fname, safe="")
            ct, cd = f"{ctype};\n name*=UTF-8''{q}", f"attachment;\n filename*=UTF-8''{q}"
        else:  # Outlook: an encoded word inside the quoted parameter (not RFC-conforming, common)
            e = self.encoded_words(fname).replace("\n ", "")
            ct, cd = f'{ctype};\n name="{e}"', f'attachment;\n filename="{e}"'
        hdr = (f"Content-Type: {ct}\nContent-Transfer-Encoding: base64\n"
               f"Content-Disposition: {cd}\n\n").encode("ascii")
        return hdr + b64_lines(data)

    def pdf_attachment(self, size, name):
        self.att["pdf"] += 1
        fname, style = self.file_name(name)
        return self.attachment("application/pdf", fname, style, self.pdf_bytes(size))

    # ---- e-filing kinds
    def ef_submission(self, ts, idx, kind):
        fill = self.fill()
        subject = self.rng.choice(EF_SUBJECTS).format(**fill)
        if kind == "short":
            target = self.rng.randint(1000, 8000)
            hdr, name = self.headers(ts, idx, subject, "podatelna@soud.example.cz", "Podatelna")
            ct = ("Content-Type: text/plain; charset=UTF-8"
                  + ("; format=flowed" if self.rng.random() < 0.4 else "")
                  + "\nContent-Transfer-Encoding: quoted-printable\n\n")
            text = self.text_of(EF_PARAS, target - len(hdr) - len(ct), name)
            return (hdr + ct + qp(text)).encode("ascii")
        hdr, name = self.headers(ts, idx, subject, "podatelna@soud.example.cz", "Podatelna")
        text = self.text_entity(self.text_of(EF_PARAS, self.rng.randint(400, 2500), name))
        if kind == "attach":
            sizes = [loguniform(self.rng, 50_000, 2_000_000) for _ in range(self.rng.randint(1, 3))]
        elif kind == "big":
            sizes = [self.rng.randint(10_000_000, 25_000_000)]
        elif kind == "forwarded-inner":
            sizes = [loguniform(self.rng, 50_000, 2_000_000)]
        else:
            raise ValueError(kind)
        ct, body = self.multipart("mixed", [text] + [self.pdf_attachment(s, name) for s in sizes])
        return (hdr + ct + "\n\n").encode("ascii") + body

    def ef_forward(self, ts, idx):
        inner = self.ef_submission(ts - self.rng.randint(7200, 5 * 86400), idx, "forwarded-inner")
        self.att["message_rfc822"] += 1
        hdr, name = self.headers(ts, idx, "Fwd: " + self.rng.choice(EF_SUBJECTS).format(**self.fill()),
                                 "podatelna@soud.example.cz", "Podatelna")
        note = self.text_entity(f"Dobrý den,\n\npřeposílám podání, které bylo omylem doručeno na "
                                f"naši adresu. Originál přikládám.\n\n{name}\nspisovna\n")
        if self.rng.random() < 0.5:
            disp = 'attachment; filename="forwarded message.eml"'
        else:
            disp = "attachment;\n filename*=UTF-8''" + urllib.parse.quote("Přeposlaná zpráva.eml", safe="")
        part = f"Content-Type: message/rfc822\nContent-Disposition: {disp}\n\n".encode("ascii") + inner
        ct, body = self.multipart("mixed", [note, part])
        return (hdr + ct + "\n\n").encode("ascii") + body

    def ef_smime(self, ts, idx):
        hdr, name = self.headers(ts, idx, self.rng.choice(EF_SUBJECTS).format(**self.fill()),
                                 "podatelna@soud.example.cz", "Podatelna")
        text = self.text_entity(self.text_of(EF_PARAS, self.rng.randint(400, 2000), name))
        if self.rng.random() < 0.5:
            ict, ibody = self.multipart("mixed", [text, self.pdf_attachment(
                loguniform(self.rng, 50_000, 2_000_000), name)])
            signed = (ict + "\n\n").encode("ascii") + ibody
        else:
            signed = text
        # DER-looking: SEQUENCE, length, OID 1.2.840.113549.1.7.2 (signedData), [0] ..., random
        n = self.rng.randint(2800, 3400)
        der = (b"\x30\x82" + n.to_bytes(2, "big") + b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x02"
               + b"\xa0\x82" + (n - 15).to_bytes(2, "big") + self.rng.randbytes(n - 15))
        self.att["pkcs7_signature"] += 1
        sig = ("Content-Type: application/pkcs7-signature; name=\"smime.p7s\"\n"
               "Content-Transfer-Encoding: base64\n"
               "Content-Disposition: attachment; filename=\"smime.p7s\"\n"
               "Content-Description: S/MIME Cryptographic Signature\n\n").encode("ascii") + b64_lines(der)
        ct, body = self.multipart("signed", [signed, sig],
                                  ' protocol="application/pkcs7-signature"; micalg=sha-256;')
        return (hdr + ct + "\n\n").encode("ascii") + body

    # ---- helpdesk kinds
    def hd_message(self, ts, idx, kind):
        r = self.rng
        subject = r.choice(HD_SUBJECTS)
        if r.random() < 0.4:
            subject = f"Re: [HD-{r.randint(10000, 99999)}] " + subject
        hdr, name = self.headers(ts, idx, subject, "helpdesk@urad.example.cz", "Helpdesk IT")
        target = loguniform(r, 1200, 30000)
        if kind == "plain":
            room = target - len(hdr) - 90
            if r.random() < 0.4:  # with a quoted earlier reply
                text = self.text_of(HD_PARAS, room * 0.6, name)
                prev = self.text_of(HD_PARAS, room * 0.35, "Helpdesk IT")
                text += "\n" + "Dne 3. 3. 2025 v 9:14 Helpdesk IT napsal(a):\n" + \
                    "".join("> " + ln + "\n" for ln in prev.splitlines())
            else:
                text = self.text_of(HD_PARAS, room, name)
            return (hdr + "Content-Type: text/plain; charset=UTF-8\n"
                    "Content-Transfer-Encoding: quoted-printable\n\n" + qp(text)).encode("ascii")
        if kind == "html":
            text = self.text_of(HD_PARAS, (target - len(hdr) - 500) / 2.3, name)
            ct, body = self.multipart("alternative", [self.text_entity(text), self.html_entity(text)])
            return (hdr + ct + "\n\n").encode("ascii") + body
        if kind == "image":
            raw = r.randint(2000, 12000)
            text = self.text_of(HD_PARAS, min(target, 29500) - len(hdr) - raw * 1.37 - 700, name)
            if r.random() < 0.5:
                img = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + r.randbytes(13) + b"\x00\x00\x00\x00IDAT"
                       + r.randbytes(raw - 45) + b"\x00\x00\x00\x00IEND\xaeB`\x82")
                ctype, fname = "image/png", f"snimek-obrazovky-{r.randint(1, 999)}.png"
            else:
                img = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01" + r.randbytes(raw - 15) + b"\xff\xd9"
                ctype, fname = "image/jpeg", f"IMG_{r.randint(1000, 9999)}.jpg"
            self.att["image"] += 1
            ct, body = self.multipart("mixed", [self.text_entity(text),
                                                self.attachment(ctype, fname, "ascii", img)])
            return (hdr + ct + "\n\n").encode("ascii") + body
        raise ValueError(kind)

    def message(self, ts, idx, kind):
        if self.profile == "efiling":
            if kind == "forward":
                return self.ef_forward(ts, idx)
            if kind == "smime":
                return self.ef_smime(ts, idx)
            return self.ef_submission(ts, idx, kind)
        return self.hd_message(ts, idx, kind)


MIX = {
    "efiling": [("short", 0.40), ("attach", 0.40), ("forward", 0.10), ("smime", 0.05), ("big", 0.05)],
    "helpdesk": [("plain", 0.60), ("html", 0.30), ("image", 0.10)],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(MIX), required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", required=True, help="corpus directory (DIR/new/ must not exist or be empty)")
    a = ap.parse_args()
    if a.n < 1:
        sys.exit("--n must be >= 1")

    out = os.path.abspath(a.out)
    new = os.path.join(out, "new")
    os.makedirs(new, exist_ok=True)
    if os.listdir(new):
        sys.exit(f"{new} is not empty; delete {out} to regenerate")
    for stale in ("stats.json", "manifest.tsv"):
        if os.path.exists(os.path.join(out, stale)):
            os.unlink(os.path.join(out, stale))

    g = Gen(a.seed, a.profile)
    mix = MIX[a.profile]
    counts = {k: round(a.n * share) for k, share in mix[1:]}
    counts = {mix[0][0]: a.n - sum(counts.values()), **counts}
    kinds = [k for k, c in counts.items() for _ in range(c)]
    g.rng.shuffle(kinds)

    t0 = time.time()
    base_ts = 1_741_590_000   # Mon 10 Mar 2025 ~07:00 UTC
    total = total_crlf = largest = 0
    rows = []
    ts = base_ts
    for i, kind in enumerate(kinds):
        ts += g.rng.randint(5, 90)
        data = g.message(ts, i, kind)
        size, crlf = len(data), len(data) + data.count(b"\n")
        fname = f"{ts}.M{i:07d}P{a.seed}.mailintake-bench,S={size},W={crlf}"
        path = os.path.join(new, fname)
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (ts, ts))
        total += size
        total_crlf += crlf
        largest = max(largest, size)
        rows.append(f"{fname}\t{kind}\t{size}\t{crlf}")
        if (i + 1) % 500 == 0:
            print(f"  {a.profile}: {i + 1}/{a.n} messages, {total / 1e6:,.0f} MB", file=sys.stderr)

    with open(os.path.join(out, "manifest.tsv"), "w") as f:
        f.write("file\tkind\tbytes\tbytes_crlf\n" + "\n".join(rows) + "\n")
    stats = {
        "profile": a.profile, "n": a.n, "seed": a.seed, "kinds": counts,
        "total_bytes": total, "total_bytes_crlf": total_crlf, "largest_message_bytes": largest,
        # attachment parts: every PDF (also those inside forwarded messages), image, smime.p7s and
        # forwarded message/rfc822 part
        "attachments": sum(g.att.values()), "attachments_by_type": dict(g.att),
        "gen_seconds": round(time.time() - t0, 1),
    }
    tmp = os.path.join(out, "stats.json.tmp")
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=1)
        f.write("\n")
    os.rename(tmp, os.path.join(out, "stats.json"))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
