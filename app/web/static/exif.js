// Reads the GPS position from a JPEG's EXIF block in the browser, before anything is uploaded.
// Only what the page needs: APP1 "Exif" -> TIFF IFD0 -> GPS IFD (tags 1-4). Other formats: null.
"use strict";

const ExifGps = (() => {
  const GPS_IFD_POINTER = 0x8825;
  const SCAN_BYTES = 256 * 1024; // EXIF sits in the first APP1 segment, within 64 KiB of the start

  async function read(file) {
    const view = new DataView(await file.slice(0, SCAN_BYTES).arrayBuffer());
    try {
      return parseJpeg(view);
    } catch (err) {
      return null; // a malformed block only means "no location"
    }
  }

  function parseJpeg(view) {
    if (view.byteLength < 4 || view.getUint16(0) !== 0xffd8) return null;
    let offset = 2;
    while (offset + 4 <= view.byteLength) {
      const marker = view.getUint16(offset);
      const length = view.getUint16(offset + 2);
      if ((marker & 0xff00) !== 0xff00 || marker === 0xffda) return null; // start of scan: no EXIF
      if (marker === 0xffe1 && view.getUint32(offset + 4) === 0x45786966) {
        return parseTiff(view, offset + 10); // "Exif\0\0"
      }
      offset += 2 + length;
    }
    return null;
  }

  function parseTiff(view, start) {
    const little = view.getUint16(start) === 0x4949;
    const u16 = (at) => view.getUint16(start + at, little);
    const u32 = (at) => view.getUint32(start + at, little);
    const entries = (ifd) => {
      const out = new Map();
      const count = u16(ifd);
      for (let i = 0; i < count; i++) {
        const at = ifd + 2 + i * 12;
        out.set(u16(at), { type: u16(at + 2), count: u32(at + 4), at: at + 8 });
      }
      return out;
    };
    const ifd0 = entries(u32(4));
    const pointer = ifd0.get(GPS_IFD_POINTER);
    if (!pointer) return null;
    const gps = entries(u32(pointer.at));
    const ref = (tag) => {
      const e = gps.get(tag);
      return e ? String.fromCharCode(view.getUint8(start + e.at)) : null;
    };
    const dms = (tag) => {
      const e = gps.get(tag);
      if (!e || e.type !== 5 || e.count < 3) return null; // three RATIONALs
      const values = u32(e.at);
      const part = (i) => u32(values + i * 8) / (u32(values + i * 8 + 4) || 1);
      return part(0) + part(1) / 60 + part(2) / 3600;
    };
    const lat = dms(2);
    const lon = dms(4);
    if (lat === null || lon === null || (lat === 0 && lon === 0)) return null;
    return { lat: ref(1) === "S" ? -lat : lat, lon: ref(3) === "W" ? -lon : lon };
  }

  return { read };
})();
