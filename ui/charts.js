// Charts drawn as inline SVG: a line chart that grows as points arrive and a scatter chart with
// its Pareto front marked. Each chart's <svg> carries `data-points` (points drawn), so tests and
// people can read what is plotted.

import { el, svg, num } from './dom.js';

const WIDTH = 640;
const HEIGHT = 260;
const MARGIN = { top: 12, right: 16, bottom: 40, left: 62 };
const SERIES_CLASSES = 6;

/** About `count` round tick values covering [low, high]. */
export function ticks(low, high, count = 5) {
  if (!(high > low)) return [low];
  const raw = (high - low) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const values = [];
  for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) {
    values.push(Number(v.toPrecision(12)));
  }
  return values;
}

/** Maps data to the plot area; pads a range of zero width so a single point is centred. */
function scales(xs, ys) {
  const extent = (values) => {
    let low = Math.min(...values);
    let high = Math.max(...values);
    if (low === high) {
      const pad = Math.abs(low) * 0.1 || 1;
      low -= pad;
      high += pad;
    } else {
      const pad = (high - low) * 0.05;
      low -= pad;
      high += pad;
    }
    return [low, high];
  };
  const [x0, x1] = extent(xs);
  const [y0, y1] = extent(ys);
  const plotWidth = WIDTH - MARGIN.left - MARGIN.right;
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  return {
    x: (v) => MARGIN.left + ((v - x0) / (x1 - x0)) * plotWidth,
    y: (v) => MARGIN.top + plotHeight - ((v - y0) / (y1 - y0)) * plotHeight,
    xTicks: ticks(x0, x1),
    yTicks: ticks(y0, y1),
  };
}

function axes(scale, xLabel, yLabel, xFormat = num) {
  const bottom = HEIGHT - MARGIN.bottom;
  const nodes = [
    svg('line', { class: 'axis', x1: MARGIN.left, y1: bottom, x2: WIDTH - MARGIN.right, y2: bottom }),
    svg('line', { class: 'axis', x1: MARGIN.left, y1: MARGIN.top, x2: MARGIN.left, y2: bottom }),
  ];
  for (const t of scale.xTicks) {
    const x = scale.x(t);
    if (x < MARGIN.left - 0.5 || x > WIDTH - MARGIN.right + 0.5) continue;
    nodes.push(svg('line', { class: 'grid', x1: x, y1: MARGIN.top, x2: x, y2: bottom }));
    nodes.push(svg('text', { class: 'tick', x, y: bottom + 14, 'text-anchor': 'middle' }, xFormat(t, 3)));
  }
  for (const t of scale.yTicks) {
    const y = scale.y(t);
    if (y < MARGIN.top - 0.5 || y > bottom + 0.5) continue;
    nodes.push(svg('line', { class: 'grid', x1: MARGIN.left, y1: y, x2: WIDTH - MARGIN.right, y2: y }));
    nodes.push(svg('text', { class: 'tick', x: MARGIN.left - 6, y: y + 4, 'text-anchor': 'end' }, num(t, 3)));
  }
  nodes.push(svg('text', { class: 'axis-label', x: (MARGIN.left + WIDTH - MARGIN.right) / 2, y: HEIGHT - 6, 'text-anchor': 'middle' }, xLabel));
  nodes.push(svg('text', {
    class: 'axis-label', x: 14, y: (MARGIN.top + bottom) / 2, 'text-anchor': 'middle',
    transform: `rotate(-90 14 ${(MARGIN.top + bottom) / 2})`,
  }, yLabel));
  return nodes;
}

function frame(kind, title, count) {
  return svg('svg', {
    class: `chart ${kind}`, viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: 'img',
    'aria-label': title, 'data-points': count,
  });
}

/**
 * A line chart fed point by point: `add(series, x, y)`, `mark(x, label)` for a vertical rule
 * (stage boundaries). Redraws at most once per animation frame.
 */
export class LineChart {
  constructor(title, xLabel, yLabel) {
    this.title = title;
    this.xLabel = xLabel;
    this.yLabel = yLabel;
    this.series = new Map();
    this.marks = [];
    this.pending = false;
    this.plot = el('div', { class: 'plot' });
    this.legend = el('div', { class: 'legend' });
    this.node = el('figure', { class: 'chart-box' }, el('figcaption', {}, title), this.plot, this.legend);
    this.draw();
  }

  get pointCount() {
    let count = 0;
    for (const points of this.series.values()) count += points.length;
    return count;
  }

  add(name, x, y) {
    if (!Number.isFinite(x) || !Number.isFinite(y)) return;
    if (!this.series.has(name)) this.series.set(name, []);
    this.series.get(name).push({ x, y });
    this.schedule();
  }

  mark(x, label) {
    this.marks.push({ x, label });
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const count = this.pointCount;
    const chart = frame('line', this.title, count);
    if (count === 0) {
      chart.append(svg('text', { class: 'empty', x: WIDTH / 2, y: HEIGHT / 2, 'text-anchor': 'middle' }, 'no points yet'));
      this.plot.replaceChildren(chart);
      this.legend.replaceChildren();
      return;
    }
    const all = [...this.series.values()].flat();
    const scale = scales(
      all.map((p) => p.x).concat(this.marks.map((m) => m.x)),
      all.map((p) => p.y),
    );
    chart.append(...axes(scale, this.xLabel, this.yLabel));
    for (const mark of this.marks) {
      const x = scale.x(mark.x);
      chart.append(svg('line', { class: 'mark', x1: x, y1: MARGIN.top, x2: x, y2: HEIGHT - MARGIN.bottom }));
      chart.append(svg('text', { class: 'mark-label', x: x + 3, y: MARGIN.top + 10 }, mark.label));
    }
    const legend = [];
    [...this.series.entries()].forEach(([name, points], i) => {
      const cls = `s${i % SERIES_CLASSES}`;
      const sorted = [...points].sort((a, b) => a.x - b.x);
      chart.append(svg('polyline', {
        class: `series ${cls}`,
        points: sorted.map((p) => `${scale.x(p.x).toFixed(1)},${scale.y(p.y).toFixed(1)}`).join(' '),
      }));
      if (sorted.length <= 300) {
        for (const p of sorted) {
          chart.append(svg('circle', { class: `point ${cls}`, cx: scale.x(p.x), cy: scale.y(p.y), r: 2.5 },
            svg('title', {}, `${name}: ${num(p.y)} at ${num(p.x)}`)));
        }
      }
      const last = sorted[sorted.length - 1];
      legend.push(el('span', { class: `key ${cls}` }, `${name} (${points.length} points, last ${num(last.y)})`));
    });
    this.plot.replaceChildren(chart);
    this.legend.replaceChildren(...legend);
  }
}

/**
 * The points no other point beats: smaller x is better, and larger y when `higherIsBetter`.
 * A point is dominated when another is at least as good on both and strictly better on one.
 */
export function paretoFront(points, higherIsBetter) {
  const atLeast = (a, b) => (higherIsBetter ? a.y >= b.y : a.y <= b.y);
  const strictly = (a, b) => (higherIsBetter ? a.y > b.y : a.y < b.y);
  return points.filter((p) => !points.some((q) => q !== p && q.x <= p.x && atLeast(q, p) &&
    (q.x < p.x || strictly(q, p))));
}

/**
 * A scatter chart of `points` ({x, y, label}) with the Pareto front (smaller x, better y) drawn
 * as a step line through its points, which are marked `pareto`.
 */
export function scatterChart(title, xLabel, yLabel, points, higherIsBetter, xFormat = num) {
  const front = new Set(paretoFront(points, higherIsBetter));
  const chart = frame('scatter', title, points.length);
  chart.setAttribute('data-pareto', front.size);
  if (points.length === 0) {
    chart.append(svg('text', { class: 'empty', x: WIDTH / 2, y: HEIGHT / 2, 'text-anchor': 'middle' }, 'choose jobs with results'));
  } else {
    const scale = scales(points.map((p) => p.x), points.map((p) => p.y));
    chart.append(...axes(scale, xLabel, yLabel, xFormat));
    const ordered = [...front].sort((a, b) => a.x - b.x);
    const steps = [];
    ordered.forEach((p, i) => {
      if (i > 0) steps.push(`${scale.x(p.x).toFixed(1)},${scale.y(ordered[i - 1].y).toFixed(1)}`);
      steps.push(`${scale.x(p.x).toFixed(1)},${scale.y(p.y).toFixed(1)}`);
    });
    chart.append(svg('polyline', { class: 'front', points: steps.join(' ') }));
    for (const p of points) {
      const onFront = front.has(p);
      chart.append(svg('circle', {
        class: onFront ? 'point pareto' : 'point dominated', cx: scale.x(p.x), cy: scale.y(p.y), r: onFront ? 6 : 4,
      }, svg('title', {}, `${p.label}: ${yLabel} ${num(p.y)}, ${xLabel} ${xFormat(p.x)}`)));
      chart.append(svg('text', { class: 'point-label', x: scale.x(p.x) + 8, y: scale.y(p.y) - 6 }, p.label));
    }
  }
  return el('figure', { class: 'chart-box' }, el('figcaption', {}, title), el('div', { class: 'plot' }, chart),
    el('div', { class: 'legend' }, el('span', { class: 'key pareto' }, 'Pareto front'),
      el('span', { class: 'key dominated' }, 'dominated')));
}
