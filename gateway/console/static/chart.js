// Stacked bars by day and series, drawn as SVG (no library).
import { h, s } from "./dom.js";

const W = 720;
const H = 220;
const PAD = { left: 56, right: 8, top: 10, bottom: 28 };

// days: ["2026-11-25", ...]; series: [[name, Map(day -> value)]]; format(value) -> label.
export function stackedBars(title, days, series, format) {
  const totals = days.map((day) => series.reduce((sum, [, values]) => sum + (values.get(day) || 0), 0));
  const max = Math.max(1e-9, ...totals);
  const width = (W - PAD.left - PAD.right) / Math.max(1, days.length);
  const scale = (value) => (value / max) * (H - PAD.top - PAD.bottom);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  svg.append(s("title", {}, title));
  for (const fraction of [0, 0.5, 1]) {
    const y = H - PAD.bottom - fraction * (H - PAD.top - PAD.bottom);
    svg.append(s("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y, class: "axis" }),
      s("text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end" }, format(max * fraction)));
  }
  days.forEach((day, i) => {
    let y = H - PAD.bottom;
    series.forEach(([name, values], k) => {
      const value = values.get(day) || 0;
      if (!value) return;
      const height = scale(value);
      y -= height;
      svg.append(s("rect", {
        x: PAD.left + i * width + width * 0.15, y, width: width * 0.7, height: Math.max(height, 1),
        class: `s${k % 6}`,
      }, s("title", {}, `${day} ${name}: ${format(value)}`)));
    });
    if (days.length <= 10 || i % Math.ceil(days.length / 8) === 0) {
      svg.append(s("text", { x: PAD.left + (i + 0.5) * width, y: H - 10, "text-anchor": "middle" },
        day.slice(5)));
    }
  });
  const legend = h("div", { class: "legend" },
    series.map(([name], k) => h("span", { class: `s${k % 6}` }, name)));
  return h("figure", { class: "chart" }, h("figcaption", { class: "muted" }, title), svg, legend);
}
