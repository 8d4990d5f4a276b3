{{/* Names and labels shared by the templates. */}}

{{- define "unict-node.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "unict-node.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "unict-node.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "unict-node.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "unict-node.selectorLabels" -}}
app.kubernetes.io/name: {{ include "unict-node.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The Secret holding the HTTP token and the database URL. */}}
{{- define "unict-node.secretName" -}}
{{- printf "%s-secrets" (include "unict-node.fullname" .) -}}
{{- end -}}

{{- define "unict-node.spoolClaim" -}}
{{- .Values.spool.existingClaim | default (printf "%s-spool" (include "unict-node.fullname" .)) -}}
{{- end -}}

{{/*
The pod spec shared by the receiver and the worker; called with
(dict "root" $ "role" "receiver" "values" .Values.receiver).
*/}}
{{- define "unict-node.podSpec" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
containers:
  - name: {{ .role }}
    image: "{{ $root.Values.image.repository }}:{{ $v.imageTag }}"
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    args:
      {{- toYaml $v.args | nindent 6 }}
    env:
      - name: UNICT_HTTP__TOKEN
        valueFrom:
          secretKeyRef:
            name: {{ $root.Values.http.existingSecret | default (include "unict-node.secretName" $root) }}
            key: http-token
      - name: UNICT_DATABASE__URL
        valueFrom:
          secretKeyRef:
            name: {{ $root.Values.database.existingSecret | default (include "unict-node.secretName" $root) }}
            key: database-url
      {{- range $name, $value := $v.env }}
      - name: {{ $name }}
        value: {{ $value | quote }}
      {{- end }}
    ports:
      - name: dicom
        containerPort: {{ $root.Values.config.dicom.port }}
        protocol: TCP
      - name: http
        containerPort: {{ $root.Values.config.http.port }}
        protocol: TCP
    startupProbe:
      httpGet: {path: /healthz, port: http}
      {{- toYaml $root.Values.probes.startup | nindent 6 }}
    livenessProbe:
      httpGet: {path: /healthz, port: http}
      {{- toYaml $root.Values.probes.liveness | nindent 6 }}
    readinessProbe:
      httpGet: {path: /readyz, port: http}
      {{- toYaml $root.Values.probes.readiness | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.securityContext | nindent 6 }}
    resources:
      {{- $resources := deepCopy $v.resources }}
      {{- if $v.gpus }}
      {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" $v.gpus) ($resources.limits | default dict)) }}
      {{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" $v.gpus) ($resources.requests | default dict)) }}
      {{- end }}
      {{- toYaml $resources | nindent 6 }}
    volumeMounts:
      - name: config
        mountPath: /etc/unict
        readOnly: true
      - name: data
        mountPath: /var/lib/unict
      - name: tmp
        mountPath: /tmp
volumes:
  - name: config
    configMap:
      name: {{ include "unict-node.fullname" $root }}-config
  - name: data
    persistentVolumeClaim:
      claimName: {{ include "unict-node.spoolClaim" $root }}
  - name: tmp
    emptyDir: {}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
