"""One test per row of the bad-input matrix (REFERENCE.md §5): archives, images, HTTP, names,
datasets, predict. Each checks the status, the problem+json body (or the per-file reason when the
file is skipped, not the upload) and that nothing was written outside the data dir or left
half-written; refused uploads must change nothing at all."""
from __future__ import annotations

import hashlib
import io
import re
import stat
import struct
import unicodedata
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from service.app import create_app
from tests.support.ingest import (Guard, assert_problem, class_folders, client, encode, guard,  # noqa: F401
                                       make_zip, noise, png, upload)
from workers.imaging import decode_image

GOOD = class_folders({"ants": 5, "bees": 5})  # a trainable base every upload below is mixed into


def reasons(body: dict) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in body["rejected"]}


def accepted_upload(client, guard, extra: dict) -> dict:
    resp = upload(client, make_zip({**GOOD, **extra}))
    assert resp.status_code == 201, resp.text
    guard.check_clean()
    return resp.json()


def patch_zip(data: bytes, record: bytes, index: int, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite a field of the index-th local (PK\\3\\4) or central (PK\\1\\2) header."""
    out, pos = bytearray(data), -1
    for _ in range(index + 1):
        pos = out.index(record, pos + 1)
    struct.pack_into(fmt, out, pos + offset, value)
    return bytes(out)


# -- archives ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_name", ["../evil.png", "/etc/evil.png", "..\\evil.png", "C:/evil.png",
                                      "C:\\evil.png", "ants/../../evil.png"])
def test_zip_slip_refuses_the_whole_archive(client, guard, settings, bad_name):
    resp = upload(client, make_zip({**GOOD, bad_name: png(99)}))
    assert_problem(resp, 422, "outside the archive", "refused")
    guard.check_unchanged()
    assert not list(settings.data_dir.parent.rglob("evil.png"))


@pytest.mark.parametrize("kind, words", [(stat.S_IFLNK, "symbolic link"), (stat.S_IFIFO, "not a regular file"),
                                         (stat.S_IFCHR, "not a regular file"), (stat.S_IFSOCK, "not a regular file")])
def test_links_and_special_files_refuse_the_archive(client, guard, kind, words):
    link = zipfile.ZipInfo("ants/link.png")
    link.create_system, link.external_attr = 3, (kind | 0o777) << 16
    resp = upload(client, make_zip([*GOOD.items(), (link, b"/etc/passwd")]))
    assert_problem(resp, 422, words)
    guard.check_unchanged()


def test_high_ratio_bomb_is_413(client, guard):
    resp = upload(client, make_zip({**GOOD, "ants/bomb.png": b"\x00" * (8 << 20)}))
    assert_problem(resp, 413, "zip bomb")
    guard.check_unchanged()


def test_overlapping_entries_refuse_the_archive(client, guard):
    data = make_zip({**GOOD, "bees/zzz.png": png(77)}, compression=zipfile.ZIP_STORED)
    # Point the last central-directory record at the first entry's data (a non-recursive bomb).
    last = len(GOOD)
    resp = upload(client, patch_zip(data, b"PK\x01\x02", last, 42, "<I", 0))
    assert_problem(resp, 422, "overlaps")
    guard.check_unchanged()


def test_too_many_entries_is_413_before_reading_them(client, guard, settings):
    settings.max_archive_entries = 30
    resp = upload(client, make_zip({**GOOD, **{f"ants/tiny{i}.txt": b"x" for i in range(25)}}))
    assert_problem(resp, 413, "entries", "30")
    guard.check_unchanged()


@pytest.mark.parametrize("declared, status, words", [(10, 422, "broken"), (10**6, 201, None)])
def test_lying_file_size_counts_what_is_actually_decompressed(client, guard, declared, status, words):
    data = make_zip(GOOD)
    resp = upload(client, patch_zip(data, b"PK\x01\x02", 0, 24, "<I", declared))
    if status == 201:  # too big a claim: the bytes really there are read, counted and accepted
        assert resp.status_code == 201 and resp.json()["num_images"] == 10
        guard.check_clean()
    else:  # too small a claim: reading stops there and the CRC check refuses the archive
        assert_problem(resp, status, words)
        guard.check_unchanged()


def test_total_decompressed_bytes_over_the_limit_is_413(client, guard, settings):
    settings.max_archive_bytes = 20_000
    resp = upload(client, make_zip({**GOOD, **{f"bees/big{i}.png": png(50 + i, size=(64, 64)) for i in range(3)}}))
    assert_problem(resp, 413, "20000")
    guard.check_unchanged()


def test_entry_over_the_per_file_limit_is_skipped_and_listed(client, guard, settings):
    settings.max_entry_bytes = 5_000
    body = accepted_upload(client, guard, {"bees/large.png": png(60, size=(80, 80))})
    assert "5000-byte limit" in reasons(body)["bees/large.png"] and body["num_images"] == 10


def test_nested_archives_are_skipped_never_extracted(client, guard):
    inner = make_zip({"ants/inner.png": png(70)})
    body = accepted_upload(client, guard, {"ants/more.zip": inner, "ants/more.tar.gz": zlib.compress(b"x"),
                                           "bees/disguised.png": inner})
    why = reasons(body)
    assert all("nested archive" in why[p] for p in ("ants/more.zip", "ants/more.tar.gz", "bees/disguised.png"))
    assert body["num_images"] == 10  # inner.png was not pulled out


def test_encrypted_entry_refuses_the_archive(client, guard):
    data = make_zip(GOOD)
    data = patch_zip(data, b"PK\x03\x04", 0, 6, "<H", 1)  # "encrypted" in the local header ...
    data = patch_zip(data, b"PK\x01\x02", 0, 8, "<H", 1)  # ... and in the central directory
    assert_problem(upload(client, data), 422, "encrypted")
    guard.check_unchanged()


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA, 99])
def test_unknown_compression_refuses_the_archive(client, guard, method):
    if method == 99:  # AES (WinZip): Python cannot even write it; patch the method fields
        data = patch_zip(make_zip(GOOD), b"PK\x03\x04", 0, 8, "<H", 99)
        data = patch_zip(data, b"PK\x01\x02", 0, 10, "<H", 99)
    else:
        data = make_zip(GOOD, compression=method)
    assert_problem(upload(client, data), 422, "compression")
    guard.check_unchanged()


@pytest.mark.parametrize("payload", [b"", b"not a zip", encode(noise(1), "GIF") + make_zip(GOOD),  # GIFAR polyglot
                                     b"\x1f\x8b\x08\x00" + b"\x00" * 40, make_zip(GOOD)[:200]])
def test_not_a_zip_or_a_broken_one_is_422(client, guard, payload):
    assert_problem(upload(client, payload), 422)
    guard.check_unchanged()


# -- images --------------------------------------------------------------------------------------

def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): a decompression bomb's opening."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_images_over_the_pixel_limit_are_rejected_from_their_header(client, guard, settings):
    settings.max_image_pixels = 10**10  # let Pillow's own bomb warning (> 89,478,485 px) fire first
    body = accepted_upload(client, guard, {"ants/bomb.png": png_header_only(10_000, 9_000)})
    assert "too large" in reasons(body)["ants/bomb.png"]
    settings.max_image_pixels = 390  # now Graft's limit, from Settings (the base images have 384)
    body = accepted_upload(client, guard, {"ants/big.png": png(61, size=(20, 20))})
    assert "at most 390" in reasons(body)["ants/big.png"]


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"


def test_formats_outside_the_allow_list_are_rejected(client, guard):
    body = accepted_upload(client, guard, {"ants/a.eps": EPS, "ants/b.ppm": encode(noise(62), "PPM"),
                                           "ants/c.ico": encode(noise(63), "ICO"), "ants/d.tga": encode(noise(64), "TGA")})
    for name in ("ants/a.eps", "ants/b.ppm", "ants/c.ico", "ants/d.tga"):
        assert "not a supported image" in reasons(body)[name]


def test_truncated_and_corrupt_images_are_rejected(client, guard):
    jpeg, pngb = encode(noise(65, size=(64, 64)), "JPEG"), png(66, size=(64, 64))
    body = accepted_upload(client, guard, {"ants/t.jpg": jpeg[: len(jpeg) // 2], "ants/t.png": pngb[: len(pngb) // 2],
                                           "ants/junk.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4})
    for name in ("ants/t.jpg", "ants/t.png", "ants/junk.jpg"):
        assert re.search("corrupt|truncated|not a supported", reasons(body)[name]), reasons(body)[name]


def test_zero_byte_file_is_rejected(client, guard):
    assert "empty" in reasons(accepted_upload(client, guard, {"ants/empty.png": b""}))["ants/empty.png"]


def _modes() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """name -> (file bytes, the RGB pixel (0, 0) must decode to)."""
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    sixteen = Image.fromarray(np.full((8, 8), 0xABCD, dtype=np.uint16))  # 16-bit grey: top byte kept
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1  # index 1 (red) is transparent: composited on white
    return {
        "cmyk.jpg": (encode(cmyk, "JPEG", quality=100), (255, 255, 255)),
        "grey16.png": (encode(sixteen, "PNG"), (0xAB, 0xAB, 0xAB)),
        "palette.png": (encode(palette, "PNG", transparency=1), (255, 255, 255)),
        "rgba.png": (encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"), (255, 255, 255)),
        "half.png": (encode(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), "PNG"), (127, 127, 127)),
        "la.png": (encode(Image.new("LA", (8, 8), (0, 0)), "PNG"), (255, 255, 255)),
        "grey.png": (encode(Image.new("L", (8, 8), 40), "PNG"), (40, 40, 40)),
        "bw.bmp": (encode(Image.new("1", (8, 8), 1), "BMP"), (255, 255, 255)),
        "cmyk.tiff": (encode(cmyk, "TIFF"), (255, 255, 255)),
    }


def test_every_mode_is_converted_to_rgb_the_same_way(client, guard):
    modes = _modes()
    body = accepted_upload(client, guard, {f"ants/{name}": data for name, (data, _) in modes.items()})
    assert body["rejected"] == [] and body["class_counts"]["ants"] == 5 + len(modes)
    assert {"CMYK", "I;16", "P", "RGBA", "LA", "L", "1"} <= set(body["report"]["image_stats"]["modes"])
    for name, (data, pixel) in modes.items():
        img = decode_image(data)  # the routine training and predict both call
        assert img.mode == "RGB" and img.getpixel((0, 0)) == pytest.approx(pixel, abs=1), name


def test_animated_gif_and_webp_use_their_first_frame(client, guard):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    files = {}
    for fmt in ("GIF", "WEBP"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
        files[f"ants/anim.{fmt.lower()}"] = buf.getvalue()
    body = accepted_upload(client, guard, files)
    assert body["class_counts"]["ants"] == 7
    for data in files.values():
        assert Image.open(io.BytesIO(data)).n_frames == 2
        assert decode_image(data).getpixel((4, 4)) == pytest.approx((255, 0, 0), abs=2)


def test_exif_rotated_photo_is_transposed_before_anything_sees_it(client, guard):
    img = Image.new("RGB", (40, 20), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(img, "JPEG", exif=exif, quality=95)
    body = accepted_upload(client, guard, {"ants/phone.jpg": data})
    image = next(i for i in client.get(f"/v1/datasets/{body['id']}/images", params={"label": "ants"}).json()
                 if i["original_name"] == "ants/phone.jpg")
    assert (image["width"], image["height"]) == (20, 40)
    shown = decode_image(data)
    assert shown.size == (20, 40) and shown.getpixel((10, 2))[0] > 200  # the band is now on top


def test_non_image_files_are_skipped_and_listed_never_fatal(client, guard):
    junk = {"notes.txt": b"hello", ".DS_Store": b"\x00\x00\x00\x01Bud1", "__MACOSX/ants/._img0.png": b"\x00\x05\x16\x07",
            ".ipynb_checkpoints/x-checkpoint.png": png(80), "ants/Thumbs.db": b"\xd0\xcf\x11\xe0",
            "ants/desktop.ini": b"[x]", "bees/readme.md": b"# hi"}
    body = accepted_upload(client, guard, junk)
    assert set(reasons(body)) == set(junk) and body["num_images"] == 10


def test_polyglots_are_judged_by_their_bytes(client, guard):
    image_with_zip_tail = png(81) + make_zip({"x.txt": b"payload"})  # a PNG that is also a zip
    zip_named_png = make_zip({"ants/inner.png": png(82)})
    body = accepted_upload(client, guard, {"ants/poly.png": image_with_zip_tail, "bees/fake.png": zip_named_png,
                                           "bees/real.txt": png(83)})  # a PNG named .txt is an image
    why = reasons(body)
    assert "ants/poly.png" not in why and "nested archive" in why["bees/fake.png"] and "bees/real.txt" not in why
    assert body["class_counts"] == {"ants": 6, "bees": 6}


# -- HTTP ----------------------------------------------------------------------------------------

def test_body_over_the_cap_is_413_declared_or_chunked_and_the_server_keeps_serving(settings, tmp_path):
    settings.max_upload_bytes = 50_000
    from fastapi.testclient import TestClient
    with TestClient(create_app(settings)) as small:
        guard = Guard(settings)
        assert_problem(upload(small, b"PK\x03\x04" + b"x" * 60_000), 413, "50000")

        def chunks():
            for _ in range(60):
                yield b"y" * 1000
        resp = small.post("/v1/datasets", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"})
        assert "content-length" not in {k.lower() for k in resp.request.headers} and resp.request.headers.get("transfer-encoding") == "chunked"
        assert_problem(resp, 413, "limit")
        guard.check_unchanged()
        assert small.get("/healthz").status_code == 200
        assert upload(small, make_zip(class_folders({"ants": 2, "bees": 2}))).status_code == 201


@pytest.mark.parametrize("fields, files, words", [
    ({f"f{i}": "x" for i in range(1001)}, {"file": ("a.zip", b"PK\x03\x04", "application/zip")}, "fields"),
    ({"name": "x" * (1024 * 1024 + 10)}, {"file": ("a.zip", b"PK\x03\x04", "application/zip")}, "maximum size"),
])
def test_starlette_multipart_caps_answer_400(client, guard, fields, files, words):
    assert_problem(client.post("/v1/datasets", data=fields, files=files), 400, words)
    guard.check_unchanged()


@pytest.mark.parametrize("kwargs, status", [
    ({"json": {"file": "x"}}, 415),
    ({"content": b"a=b", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415),
    ({"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400),  # no boundary
    ({"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=zz"}}, 400),
    ({"files": {"other": ("a.zip", b"PK", "application/zip")}}, 422),  # no part named 'file'
])
def test_wrong_content_types_are_4xx(client, guard, kwargs, status):
    assert_problem(client.post("/v1/datasets", **kwargs), status)
    guard.check_unchanged()


def test_file_type_is_decided_by_magic_bytes_not_headers_or_names(client, guard):
    # A zip sent as image/png named photo.png is still a zip; a PNG sent as application/zip is not one.
    assert upload(client, make_zip(GOOD), filename="photo.png", content_type="image/png").status_code == 201
    assert_problem(upload(client, png(84), filename="set.zip"), 422, "not a zip")


def test_file_names_are_stored_under_server_ids_and_kept_only_as_cleaned_metadata(client, guard, settings):
    long = "a" * 300 + ".png"
    names = {"ants/caf\u00e9.png": png(85), "ants/cafe\u0301.png": png(86),  # NFC / NFD twins
             "ants/\u202egnp.exe": png(87), f"ants/{long}": png(88)}
    body = accepted_upload(client, guard, names)
    assert body["rejected"] == [] and body["class_counts"]["ants"] == 9
    stored = {i["original_name"] for i in client.get(f"/v1/datasets/{body['id']}/images", params={"limit": 100}).json()}
    assert all(unicodedata.is_normalized("NFC", n) and "\u202e" not in n for n in stored)
    assert "ants/\ufffdgnp.exe" in stored and sum(n == "ants/caf\u00e9.png" for n in stored) == 1
    assert all(len(part.encode()) <= 255 for n in stored for part in n.split("/"))
    blobs = [p for p in settings.blobs_dir.rglob("*") if p.is_file()]
    assert blobs and all(re.fullmatch(r"[0-9a-f]{64}", p.name) and p.parent.name == p.name[:2] for p in blobs)
    # A client-sent file name with a path in it is metadata too.
    added = client.post(f"/v1/datasets/{body['id']}/images", data={"label": "bees"},
                        files={"file": ("../../etc/\u202epasswd\x00.png", png(89), "image/png")})
    assert added.status_code == 200, added.text
    names = [i["original_name"] for i in client.get(f"/v1/datasets/{body['id']}/images", params={"label": "bees"}).json()]
    assert names[-1].startswith("\ufffdpasswd") and names[-1].endswith(".png")  # the client may %-encode the NUL
    guard.check_clean()


# -- datasets ------------------------------------------------------------------------------------

def test_one_class_is_untrainable_and_a_job_on_it_is_422(client, guard):
    body = upload(client, make_zip(class_folders({"ants": 6}))).json()
    assert not body["trainable"] and "at least 2 classes" in body["report"]["problems"][0]
    assert_problem(client.post("/v1/jobs", json={"dataset_id": body["id"]}), 422, "at least 2 classes")
    guard.check_clean()


def test_a_class_below_the_minimum_is_422_naming_it(client, guard):
    body = upload(client, make_zip(class_folders({"ants": 3, "bees": 6}))).json()
    assert body["report"]["problems"] == ["class 'ants' has 3 images; at least 5 are needed to train, 20+ recommended"]
    problem = assert_problem(client.post("/v1/jobs", json={"dataset_id": body["id"]}), 422, "'ants'", "at least 5")
    assert problem["problems"] == body["report"]["problems"]
    assert client.get("/v1/jobs").json() == []


def test_the_same_file_under_two_labels_is_a_reported_conflict(client, guard):
    shared = png(90)
    body = accepted_upload(client, guard, {"ants/x.png": shared, "bees/y.png": shared})
    assert body["report"]["conflicts"] == [{"sha256": hashlib.sha256(shared).hexdigest(), "labels": ["ants", "bees"],
                                            "paths": ["ants/x.png", "bees/y.png"]}]
    assert "conflicting labels" in reasons(body)["ants/x.png"] and body["num_images"] == 10


def test_duplicates_within_a_class_are_collapsed_and_counted(client, guard):
    body = accepted_upload(client, guard, {"ants/copy1.png": GOOD["ants/img0.png"], "ants/copy2.png": GOOD["ants/img0.png"]})
    assert body["report"]["duplicates"] == [{"label": "ants", "kept": "ants/img0.png",
                                             "dropped": ["ants/copy1.png", "ants/copy2.png"]}]
    assert body["class_counts"] == {"ants": 5, "bees": 5}


def test_labels_are_normalised_capped_and_case_collisions_refused(client, guard, settings):
    settings.max_label_length = 20
    body = accepted_upload(client, guard, {"  cafe\u0301s  /a.png": png(91), "caf\u00e9s/b.png": png(92),
                                           f"{'x' * 21}/c.png": png(93)})
    assert body["class_counts"]["caf\u00e9s"] == 2  # NFD and padded folder names are the same class
    assert "at most 20" in reasons(body)[f"{'x' * 21}/c.png"]
    resp = upload(client, make_zip({**GOOD, "Ants/a.png": png(94)}))
    assert_problem(resp, 422, "'Ants' and 'ants'", "letter case")
    dataset = body["id"]
    for label, words in (("a/b", "separator"), ("=HYPERLINK(x)", "formula"), ("ANTS", "letter case")):
        assert_problem(client.post(f"/v1/datasets/{dataset}/images", data={"label": label},
                                   files={"file": ("n.png", png(95), "image/png")}), 422, words)


def test_manifest_paths_outside_the_archive_refuse_it_and_formula_cells_are_rejected(client, guard):
    files = {f"flat/{name}": data for name, data in GOOD.items()}
    rows = "".join(f"flat/{name},{name.split('/')[0]}\n" for name in GOOD)
    for bad in ("../etc/passwd", "/etc/passwd", "..\\x.png", "C:/x.png"):
        resp = upload(client, make_zip({**files, "labels.csv": f"path,label\n{rows}{bad},ants\n".encode()}))
        assert_problem(resp, 422, "outside the archive")
        guard.check_unchanged()
    extra = {"flat/f1.png": png(96), "flat/f2.png": png(97), "flat/f3.png": png(98)}
    csv = (f"path,label\n{rows}flat/f1.png,=cmd|' /C calc'!A0\nflat/f2.png,@SUM(1)\nflat/f3.png,+1\n").encode()
    body = accepted_upload(client, guard, {**files, **extra, "labels.csv": csv})
    why = reasons(body)
    assert all("formula" in why[p] for p in extra), why
    assert body["classes"] == ["ants", "bees"]


# -- predict and weights -------------------------------------------------------------------------

def test_predict_unknown_and_not_ready_models(client, guard):
    data = {"file": ("a.png", png(99), "image/png")}
    assert_problem(client.post("/v1/models/nope/predict", files=data), 404)
    assert_problem(client.post("/v1/models/%00/predict", files=data), 404)
    dataset = upload(client, make_zip(GOOD)).json()["id"]
    job = client.post("/v1/jobs", json={"dataset_id": dataset}).json()
    assert_problem(client.post(f"/v1/models/{job['id']}/predict", files=data), 409, "not ready")
